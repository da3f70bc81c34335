"""The comparison where forgetting happens: every method's lr chosen on validation, then its chains at that lr,
and ProCL against each baseline as paired differences with bootstrap intervals.

    nohup nice -n 19 .venv/bin/python benchmarks/cl_comparison.py > runs/comparison.log 2>&1 &  # resumable
    .venv/bin/python benchmarks/cl_comparison.py --report     # the tables from what has finished
    .venv/bin/python benchmarks/cl_comparison.py --out runs/clc-quick --quick       # tiny Llama, checks the script

1. Selection: each method at every lr of --lrs on the first order and seed (a method with a weight of its own,
   l2_prev's, n_lora's and o_lora's, at every lr x weight of WEIGHTS); the setting with the best final *validation*
   AA (ties: the smaller lr, then the larger weight) is its setting, written to <out>/lr_choice.json with every
   candidate's score.
2. Chains: each method at its setting on every order x seed, one (order, seed) for all methods at a time, so
   that the paired comparison grows evenly when the run is stopped.
Every (method, setting) is a cl_quality folder <out>/<method>/[<weight>-<value>/]lr-<lr> (MLflow store,
runs.jsonl; a re-run skips finished chains, so the same command continues after a stop). The default --out,
benchmarks/results/comparison, is in the repository: its .gitignore keeps the small results (runs.jsonl, settings, zero-shot rows, lr choices,
report) and drops the stores and checkpoints, so that a run spread over sessions on fresh checkouts is committed
and continued. The first run pins its commit (<out>/commit.txt) and a run from another commit is refused: one
table, one version of the code (continue from a worktree at that commit). The report (also <out>/report.md) has
the table (pipeline.report's format), the lr choices, and for each ProCL variant against each other method the
paired difference over the chains both ran, mean and 95 % bootstrap interval, of final AA, BWT and forgetting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cl_table import chains as table_chains  # noqa: E402

from pipeline.report import markdown  # noqa: E402
from procl import metrics  # noqa: E402

# method -> (strategy, config overrides); every method gets the same stream, sizes and lr grid
METHODS: dict[str, tuple[str, list[str]]] = {
    "seq_lora": ("seq_lora", []),
    "l2_prev": ("l2_prev", []),
    "o_lora": ("o_lora", []),
    "n_lora": ("n_lora", []),
    "procl": ("procl", []),
    "procl_budgeted": ("procl", ["strategy.procl.routing=budgeted"]),
    "procl_fixed": ("procl", ["strategy.procl.routing=fixed"]),
    "replay": ("replay", []),
    "inc_lora": ("inc_lora", []),
    "multitask": ("multitask", []),
}
# a method's own weight, chosen on validation together with the lr: (config key, candidates)
# (the first is the default each began at: each lost to seq_lora on validation there, so the grid goes down)
WEIGHTS: dict[str, tuple[str, list[float]]] = {
    "l2_prev": ("strategy.l2_weight", [1.0, 0.1, 0.01]),
    "n_lora": ("strategy.l1_weight", [1e-3, 1e-4, 1e-5]),
    "o_lora": ("strategy.lambda1", [0.5, 0.05, 0.005]),
}
# the methods the table must have, the new ProCL variant and its closest comparisons first
REQUIRED = ["procl_budgeted", "seq_lora", "procl", "procl_fixed", "l2_prev", "n_lora", "o_lora"]
PAIRED_METRICS = {"average_accuracy": "AA", "backward_transfer": "BWT", "forgetting": "forgetting"}


def pin_commit(out: Path) -> str:
    """The commit every chain of `out` runs at: written by the first run, a later run from another commit is refused
    (the data sampling, the method and the scoring all live in the code, and a table must come from one version)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    pinned = out / "commit.txt"
    if not pinned.exists():
        pinned.write_text(head + "\n")
    elif pinned.read_text().strip() != head:
        raise SystemExit(f"error: {out} holds chains run at commit {pinned.read_text().strip()}, this checkout is at {head}; "
                         f"continue from that commit: git worktree add /tmp/cmp {pinned.read_text().strip()}, and run "
                         f"benchmarks/cl_comparison.py --out {out} from there")
    return head


@dataclass(frozen=True)
class Setting:
    """One candidate of a method's selection: its lr and, for a method in WEIGHTS, its weight."""

    lr: float
    weight: float | None = None

    def overrides(self, method: str) -> list[str]:
        return [f"training.lr={self.lr:g}"] + ([f"{WEIGHTS[method][0]}={self.weight:g}"] if self.weight is not None else [])

    def describe(self, method: str) -> str:
        return f"lr {self.lr:g}" + (f", {weight_name(method)} {self.weight:g}" if self.weight is not None else "")


def weight_name(method: str) -> str:
    return WEIGHTS[method][0].rsplit(".", 1)[-1]


def weights(method: str) -> list[float | None]:
    """The candidates of a method's own weight; [None] for a method without one."""
    return WEIGHTS[method][1] if method in WEIGHTS else [None]


def candidates(args: argparse.Namespace, method: str) -> list[Setting]:
    return [Setting(lr, weight) for weight in weights(method) for lr in args.lrs]


def folder(out: Path, method: str, setting: Setting) -> Path:
    weight = f"{weight_name(method)}-{setting.weight:g}" if setting.weight is not None else ""
    return out / method / weight / f"lr-{setting.lr:g}"


def run_chains(args: argparse.Namespace, method: str, setting: Setting, orders: list[str], seeds: list[int]) -> None:
    """cl_quality.py for one (method, setting) folder: the chains not run yet."""
    strategy, overrides = METHODS[method]
    command = [sys.executable, str(ROOT / "benchmarks" / "cl_quality.py"), "--out", str(folder(args.out, method, setting)),
               "--config", str(args.config), "--stream", str(args.stream), "--strategies", strategy,
               "--orders", *orders, "--seeds", *map(str, seeds), "--train", str(args.train),
               "--validation", str(args.validation), "--test", str(args.test), "--threads", str(args.threads),
               "--zero-shot", str(args.out / "zero_shot.json")]
    for override in [*setting.overrides(method), *args.overrides, *overrides]:
        command += ["--set", override]
    print(f"== {method} {setting.describe(method)}: {' '.join(orders)} seeds {' '.join(map(str, seeds))}", flush=True)
    subprocess.run(command, check=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})


def records(out: Path, method: str, setting: Setting) -> list[dict]:
    results = folder(out, method, setting) / "runs.jsonl"
    strategy = METHODS[method][0]
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return [r for r in rows if r["strategy"] == strategy]


def final_validation_aa(record: dict) -> float:
    return metrics.average_accuracy(record["validation_matrix"])


def choose_setting(args: argparse.Namespace, method: str) -> tuple[Setting | None, dict[Setting, float]]:
    """The setting whose selection chain has the best final validation AA, with every finished candidate's score."""
    order, seed = args.orders[0], args.seeds[0]
    scores = {}
    for setting in candidates(args, method):
        found = [r for r in records(args.out, method, setting) if r["order"] == order and r["seed"] == seed]
        if found:
            scores[setting] = round(final_validation_aa(found[0]), 4)
    if len(scores) < len(candidates(args, method)):
        return None, scores
    # ties go to the smaller lr, then to the larger weight (the stronger regulariser: a method's own mechanism)
    best = max(scores, key=lambda s: (scores[s], -s.lr, s.weight or 0.0))
    return best, scores


def selection_record(method: str, best: Setting | None, scores: dict[Setting, float], selected_on: str) -> dict:
    """lr_choice.json's entry: the chosen lr (and weight) and the validation AA of every candidate."""
    lr = None if best is None else best.lr
    if method not in WEIGHTS:
        return {"lr": lr, "validation_aa": {f"{s.lr:g}": aa for s, aa in scores.items()}, "selected_on": selected_on}
    name = weight_name(method)
    return {"lr": lr, name: None if best is None else best.weight, "selected_on": selected_on,
            "validation_aa": {f"{name} {w:g}": {f"{s.lr:g}": aa for s, aa in scores.items() if s.weight == w}
                              for w in weights(method)}}


def report(args: argparse.Namespace, methods: list[str]) -> str:
    choices = {m: choose_setting(args, m) for m in methods}
    selected_on = f"{args.orders[0]} seed {args.seeds[0]}"
    selections = {m: selection_record(m, best, scores, selected_on) for m, (best, scores) in choices.items()}
    (args.out / "lr_choice.json").write_text(json.dumps(selections, indent=1))
    lines = [f"lr (and a method's own weight) chosen on validation ({selected_on}, final validation AA per lr):", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " | chosen |", "|---|" + "---|" * (len(args.lrs) + 1)]
    for method, (best, scores) in choices.items():
        for weight in weights(method):
            cells = [f"{scores[Setting(lr, weight)]:.3f}" if Setting(lr, weight) in scores else "—" for lr in args.lrs]
            label = method if weight is None else f"{method}, {weight_name(method)} {weight:g}"
            chosen = "—" if best is None else (f"{best.lr:g}" if best.weight == weight else "")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {chosen} |")
    chosen = {m: [r for r in records(args.out, m, best) if r["order"] in args.orders and r["seed"] in args.seeds]
              for m, (best, _) in choices.items() if best is not None}
    stream = yaml.safe_load(args.stream.read_text())["name"]
    scored = [replace(chain, label=method, stream=stream) for method, rows in chosen.items() for chain in table_chains(rows, "test")]
    if scored:
        lines += ["", "At the chosen setting, test split:", "", markdown(scored)]
    by_chain = {m: {(r["order"], r["seed"]): metrics.summary(r["matrix"]) for r in rows} for m, rows in chosen.items()}
    for variant in [m for m in by_chain if m.startswith("procl")]:
        lines += ["", f"{variant} minus each method, paired over the chains both ran (mean [95 % bootstrap interval]; "
                      "higher AA and BWT are better, lower forgetting is better):", "",
                  "| method | chains | " + " | ".join(PAIRED_METRICS.values()) + " |", "|---|---|" + "---|" * len(PAIRED_METRICS)]
        for other in [m for m in by_chain if m != variant]:
            common = sorted(set(by_chain[variant]) & set(by_chain[other]))
            if not common:
                continue
            cells = []
            for key in PAIRED_METRICS:
                mean, low, high = metrics.paired_bootstrap_interval([by_chain[variant][c][key] - by_chain[other][c][key] for c in common])
                cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
            lines.append(f"| {other} | {len(common)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "comparison")
    parser.add_argument("--methods", nargs="+", default=REQUIRED, choices=sorted(METHODS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--orders", nargs="+", default=["order1", "order2", "order3"], help="the first is the selection order")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="the first is the selection seed")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--stream", type=Path, default=ROOT / "configs" / "streams" / "long.yaml")
    parser.add_argument("--train", type=int, default=192, help="training examples per task (48 optimizer steps of 4)")
    parser.add_argument("--validation", type=int, default=40)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=["training.max_length=192"], metavar="KEY=VALUE",
                        help="config overrides for every chain (default: training.max_length=192, which holds the stream's prompts)")
    parser.add_argument("--report", action="store_true", help="only print the tables of what has finished")
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 2 lrs, 1 order, 1 seed, 16/4/8 examples")
    args = parser.parse_args()
    if args.quick:
        args.lrs, args.orders, args.seeds, args.train, args.validation, args.test = args.lrs[:2], args.orders[:1], args.seeds[:1], 16, 4, 8
        args.overrides = [*args.overrides, "model.name=tiny-llama"]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        pin_commit(args.out)
        for method in args.methods:  # 1. selection
            for setting in candidates(args, method):
                run_chains(args, method, setting, args.orders[:1], args.seeds[:1])
        for order in args.orders:  # 2. chains, one (order, seed) for every method at a time
            for seed in args.seeds:
                for method in args.methods:
                    run_chains(args, method, choose_setting(args, method)[0], [order], [seed])
    print(report(args, args.methods))


if __name__ == "__main__":
    main()
