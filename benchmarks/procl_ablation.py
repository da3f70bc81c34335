"""Why ProCL trails or leads seq_lora: one ProCL setting changed at a time, side by side.

    nohup nice -n 19 .venv/bin/python benchmarks/procl_ablation.py --out runs/procl_ablation > runs/procl_ablation.log 2>&1 &

Each variant is a `benchmarks/cl_quality.py` run (same stream, sizes and budget as the main table)
into `<out>/<variant>/`, on order1 with seed 0 by default (a chain takes 4-10 min here); the variants
run in the order listed, so a run cut short still has the most informative ones, and re-running
resumes. The main table's chains on the same orders and seeds (`--baseline`) are shown beside them. The table
ranks variants by **validation** average accuracy (the only selection rule the main table allows),
shows test AA, learning accuracy (LA: each task right after training it) and BWT next to it, and the mean sorted slot plasticity rho-bar of the ProCL tasks:
how far routing differentiated the slots (1 1 1 1 = never, ProCL then trains like seq_lora).
One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from procl import metrics  # noqa: E402

# name -> (strategies, config overrides), most informative first. The unchanged methods' rows come from
# the main table's folder (--baseline) for the same orders and seeds: a chain is deterministic, so
# running them again would only repeat them.
VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "default": (["procl"], []),
    "tau=0.25": (["procl"], ["strategy.procl.tau=0.25"]),
    "ema_lambda=0.5": (["procl"], ["strategy.procl.ema_lambda=0.5"]),
    "protect_weight=0": (["procl"], ["strategy.procl.protect_weight=0"]),
    "routed_factors=A": (["procl"], ["strategy.procl.routed_factors=A"]),
    "routed_factors=B": (["procl"], ["strategy.procl.routed_factors=B"]),
    "router_lr_scale=50": (["procl"], ["strategy.procl.router_lr_scale=50"]),
    "num_slots=2": (["procl"], ["strategy.procl.num_slots=2"]),
    "lr=0.001": (["procl", "seq_lora"], ["training.lr=0.001"]),
    "epochs=2": (["procl", "seq_lora"], ["training.epochs=2"]),
    "tau=4": (["procl"], ["strategy.procl.tau=4"]),
    "num_slots=8": (["procl"], ["strategy.procl.num_slots=8"]),
    "ema_lambda=0.99": (["procl"], ["strategy.procl.ema_lambda=0.99"]),
}


def folder_name(variant: str) -> str:
    return variant.replace("=", "-")


def _row(variant: str, strategy: str, records: list[dict]) -> dict:
    test = [metrics.summary(r["matrix"]) for r in records]
    validation = [metrics.summary(r["validation_matrix"]) for r in records]
    plasticity = [p for r in records for p in r.get("sorted_plasticity", [])]
    return {
        "variant": variant, "strategy": strategy, "runs": len(records),
        "validation_aa": statistics.mean(v["average_accuracy"] for v in validation),
        "test_aa": statistics.mean(t["average_accuracy"] for t in test),
        "test_la": statistics.mean(t["learning_accuracy"] for t in test),
        "test_bwt": statistics.mean(t["backward_transfer"] for t in test),
        "sorted_plasticity": [round(statistics.mean(col), 2) for col in zip(*plasticity)] if plasticity else None,
    }


def _records(results: Path, orders: list[str], seeds: list[str]) -> dict[str, list[dict]]:
    """Per strategy, the chains of `results` (a runs.jsonl) on the given orders and seeds."""
    by_strategy: dict[str, list[dict]] = {}
    if results.exists():
        for record in map(json.loads, results.read_text().splitlines()):
            if record["order"] in orders and str(record["seed"]) in seeds:
                by_strategy.setdefault(record["strategy"], []).append(record)
    return by_strategy


def summarize(out: Path, variants: list[str], baseline: Path, orders: list[str], seeds: list[str]) -> list[dict]:
    rows = [_row("main table", strategy, records) for strategy, records in _records(baseline / "runs.jsonl", orders, seeds).items()]
    for variant in variants:
        for strategy, records in _records(out / folder_name(variant) / "runs.jsonl", orders, seeds).items():
            rows.append(_row(variant, strategy, records))
    return sorted(rows, key=lambda row: -row["validation_aa"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="one folder per variant below it (re-running resumes)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--orders", nargs="+", default=["order1"])
    parser.add_argument("--seeds", nargs="+", default=["0"])
    parser.add_argument("--threads", default="2")
    parser.add_argument("--baseline", type=Path, default=ROOT / "runs" / "cl_quality",
                        help="the main table's folder: its chains on the same orders and seeds are shown beside the variants")
    parser.add_argument("--summary-only", action="store_true", help="print the table of what has finished, run nothing")
    args = parser.parse_args()

    if not args.summary_only:
        for variant in args.variants:
            strategies, overrides = VARIANTS[variant]
            command = [sys.executable, str(ROOT / "benchmarks" / "cl_quality.py"), "--out", str(args.out / folder_name(variant)),
                       "--strategies", *strategies, "--orders", *args.orders, "--seeds", *args.seeds, "--threads", args.threads]
            for override in overrides:
                command += ["--set", override]
            print(f"== {variant}: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True)

    rows = summarize(args.out, args.variants, args.baseline, args.orders, args.seeds)
    print(f"\n{'variant':<18} {'strategy':<9} {'runs':>4} {'val AA':>7} {'test AA':>7} {'test LA':>7} {'test BWT':>8}  sorted plasticity (ProCL tasks)")
    for row in rows:
        plasticity = " ".join(f"{p:.2f}" for p in row["sorted_plasticity"]) if row["sorted_plasticity"] else ""
        print(f"{row['variant']:<18} {row['strategy']:<9} {row['runs']:>4} {row['validation_aa']:>7.3f} {row['test_aa']:>7.3f} "
              f"{row['test_la']:>7.3f} {row['test_bwt']:>+8.3f}  {plasticity}")
    print(json.dumps({"benchmark": "procl_ablation", "orders": args.orders, "seeds": args.seeds, "rows": rows}))


if __name__ == "__main__":
    main()
