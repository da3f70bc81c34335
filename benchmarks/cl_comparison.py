"""The comparison where forgetting happens: every method's lr chosen on validation, then its chains at that lr,
and ProCL against each baseline as paired differences with bootstrap intervals.

    nohup nice -n 19 .venv/bin/python benchmarks/cl_comparison.py > runs/comparison.log 2>&1 &  # resumable
    .venv/bin/python benchmarks/cl_comparison.py --report     # the tables from what has finished
    .venv/bin/python benchmarks/cl_comparison.py --out runs/clc-quick --quick       # tiny Llama, checks the script

1. Selection: each method at every lr of --lrs on the first order and seed; the lr with the best final
   *validation* AA (ties: the smaller lr) is its lr, written to <out>/lr_choice.json with every candidate's score.
2. Chains: each method at its lr on every order x seed, one (order, seed) for all methods at a time, so that
   the paired comparison grows evenly when the run is stopped.
Every (method, lr) is a cl_quality folder <out>/<method>/lr-<lr> (MLflow store, runs.jsonl; a re-run skips
finished chains, so the same command continues after a stop). The default --out, benchmarks/results/comparison,
is in the repository: its .gitignore keeps the small results (runs.jsonl, settings, zero-shot rows, lr choices,
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
from dataclasses import replace
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


def folder(out: Path, method: str, lr: float) -> Path:
    return out / method / f"lr-{lr:g}"


def run_chains(args: argparse.Namespace, method: str, lr: float, orders: list[str], seeds: list[int]) -> None:
    """cl_quality.py for one (method, lr) folder: the chains not run yet."""
    strategy, overrides = METHODS[method]
    command = [sys.executable, str(ROOT / "benchmarks" / "cl_quality.py"), "--out", str(folder(args.out, method, lr)),
               "--config", str(args.config), "--stream", str(args.stream), "--strategies", strategy,
               "--orders", *orders, "--seeds", *map(str, seeds), "--train", str(args.train),
               "--validation", str(args.validation), "--test", str(args.test), "--threads", str(args.threads),
               "--zero-shot", str(args.out / "zero_shot.json")]
    for override in [f"training.lr={lr:g}", *args.overrides, *overrides]:
        command += ["--set", override]
    print(f"== {method} lr {lr:g}: {' '.join(orders)} seeds {' '.join(map(str, seeds))}", flush=True)
    subprocess.run(command, check=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})


def records(out: Path, method: str, lr: float) -> list[dict]:
    results = folder(out, method, lr) / "runs.jsonl"
    strategy = METHODS[method][0]
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return [r for r in rows if r["strategy"] == strategy]


def final_validation_aa(record: dict) -> float:
    return metrics.average_accuracy(record["validation_matrix"])


def choose_lr(args: argparse.Namespace, method: str) -> tuple[float | None, dict[str, float]]:
    """The lr whose selection chain has the best final validation AA, with every finished candidate's score."""
    order, seed = args.orders[0], args.seeds[0]
    scores = {}
    for lr in args.lrs:
        found = [r for r in records(args.out, method, lr) if r["order"] == order and r["seed"] == seed]
        if found:
            scores[f"{lr:g}"] = round(final_validation_aa(found[0]), 4)
    if len(scores) < len(args.lrs):
        return None, scores
    best = max(args.lrs, key=lambda lr: (scores[f"{lr:g}"], -lr))  # ties go to the smaller lr
    return best, scores


def report(args: argparse.Namespace, methods: list[str]) -> str:
    choices = {m: choose_lr(args, m) for m in methods}
    (args.out / "lr_choice.json").write_text(json.dumps(
        {m: {"lr": lr, "validation_aa": scores, "selected_on": f"{args.orders[0]} seed {args.seeds[0]}"}
         for m, (lr, scores) in choices.items()}, indent=1))
    lines = [f"lr chosen on validation ({args.orders[0]} seed {args.seeds[0]}, final validation AA per lr):", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " | chosen |", "|---|" + "---|" * (len(args.lrs) + 1)]
    for method, (lr, scores) in choices.items():
        cells = [f"{scores[f'{x:g}']:.3f}" if f"{x:g}" in scores else "—" for x in args.lrs]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'—' if lr is None else f'{lr:g}'} |")
    chosen = {m: [r for r in records(args.out, m, lr) if r["order"] in args.orders and r["seed"] in args.seeds]
              for m, (lr, _) in choices.items() if lr is not None}
    stream = yaml.safe_load(args.stream.read_text())["name"]
    scored = [replace(chain, label=method, stream=stream) for method, rows in chosen.items() for chain in table_chains(rows, "test")]
    if scored:
        lines += ["", "At the chosen lr, test split:", "", markdown(scored)]
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
            for lr in args.lrs:
                run_chains(args, method, lr, args.orders[:1], args.seeds[:1])
        for order in args.orders:  # 2. chains, one (order, seed) for every method at a time
            for seed in args.seeds:
                for method in args.methods:
                    run_chains(args, method, choose_lr(args, method)[0], [order], [seed])
    print(report(args, args.methods))


if __name__ == "__main__":
    main()
