"""The markdown table of docs/RESULTS.md from a cl_quality folder's runs.jsonl.

    .venv/bin/python benchmarks/cl_table.py runs/cl_quality

One row per strategy: final average accuracy / BWT of each chain (columns: order x seed), then mean
+- std over the chains of AA, learning accuracy (each task right after training it), BWT and
forgetting. Test split; `--split validation` for the validation matrices; `--matrices` prints every
chain's accuracy matrix instead (docs/CL_MATRICES.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procl import metrics  # noqa: E402

LABELS = {"procl": "procl (residual, N 4)", "multitask": "multitask (upper bound)"}


def mean_std(values: list[float], signed: bool = False) -> str:
    """"mean +- std" over the runs (NaN values skipped; "n/a" when none is left)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    mean = f"{statistics.mean(values):+.3f}" if signed else f"{statistics.mean(values):.3f}"
    return mean + (f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def table(records: list[dict], split: str) -> str:
    key = "matrix" if split == "test" else "validation_matrix"
    columns = sorted({(r["order"], r["seed"]) for r in records})
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    lines = [
        "| strategy | " + " | ".join(f"{order} seed {seed}" for order, seed in columns)
        + " | AA (runs) | LA | BWT | forgetting |",
        "|---" * (len(columns) + 5) + "|",
    ]
    for strategy in strategies:
        runs = {(r["order"], r["seed"]): metrics.summary(r[key]) for r in records if r["strategy"] == strategy}
        cells = [f"{runs[c]['average_accuracy']:.3f} / {runs[c]['backward_transfer']:+.3f}" if c in runs else "" for c in columns]
        values = {m: [s[m] for s in runs.values()] for m in ("average_accuracy", "learning_accuracy", "backward_transfer", "forgetting")}
        lines.append(f"| {LABELS.get(strategy, strategy)} | " + " | ".join(cells)
                     + f" | {mean_std(values['average_accuracy'])} ({len(runs)}) | {mean_std(values['learning_accuracy'])}"
                     + f" | {mean_std(values['backward_transfer'], signed=True)} | {mean_std(values['forgetting'])} |")
    return "\n".join(lines)


def matrices(records: list[dict], split: str) -> str:
    """Every chain's accuracy matrix: the zero-shot row, then one row per trained task."""
    key = "matrix" if split == "test" else "validation_matrix"
    parts = []
    for r in sorted(records, key=lambda r: (r["strategy"], r["order"], r["seed"])):
        header = "| after | " + " | ".join(r["tasks"]) + " |"
        rows = [" | ".join("" if math.isnan(v) else f"{v:.3f}" for v in row) for row in r[key]]  # NaN: not seen yet
        labels = ["zero-shot", *r["tasks"]]
        parts.append(f"**{r['strategy']}, {r['order']} seed {r['seed']}** ({split})\n\n{header}\n" + "|---" * (len(r["tasks"]) + 1)
                     + "|\n" + "\n".join(f"| {label} | {row} |" for label, row in zip(labels, rows)))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a cl_quality --out folder")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--matrices", action="store_true", help="every chain's accuracy matrix instead of the summary table")
    args = parser.parse_args()
    results = args.folder / "runs.jsonl"
    if not results.exists():
        raise SystemExit(f"error: {results} not found: give the --out folder of a cl_quality run")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    print(matrices(records, args.split) if args.matrices else table(records, args.split))


if __name__ == "__main__":
    main()
