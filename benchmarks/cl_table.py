"""The markdown table of docs/RESULTS.md from a cl_quality folder's runs.jsonl.

    .venv/bin/python benchmarks/cl_table.py runs/cl_quality

One row per strategy: final average accuracy / BWT of each chain (columns: order x seed), then mean
+- std of AA over the chains, and the means of learning accuracy (each task right after training it),
BWT and forgetting. Test split; `--split validation` for the validation matrices.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procl import metrics  # noqa: E402

LABELS = {"procl": "procl (residual, N 4)", "multitask": "multitask (upper bound)"}


def table(records: list[dict], split: str) -> str:
    key = "matrix" if split == "test" else "validation_matrix"
    columns = sorted({(r["order"], r["seed"]) for r in records})
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    lines = [
        "| strategy | " + " | ".join(f"{order} seed {seed}" for order, seed in columns)
        + " | mean AA +- std (runs) | mean LA | mean BWT | mean forgetting |",
        "|---" * (len(columns) + 5) + "|",
    ]
    for strategy in strategies:
        runs = {(r["order"], r["seed"]): metrics.summary(r[key]) for r in records if r["strategy"] == strategy}
        cells = [f"{runs[c]['average_accuracy']:.3f} / {runs[c]['backward_transfer']:+.3f}" if c in runs else "" for c in columns]
        aa = [s["average_accuracy"] for s in runs.values()]
        spread = f" +- {statistics.stdev(aa):.3f}" if len(aa) > 1 else ""
        means = [statistics.mean(s[m] for s in runs.values()) for m in ("learning_accuracy", "backward_transfer", "forgetting")]
        lines.append(f"| {LABELS.get(strategy, strategy)} | " + " | ".join(cells)
                     + f" | {statistics.mean(aa):.3f}{spread} ({len(aa)}) | {means[0]:.3f} | {means[1]:+.3f} | {means[2]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a cl_quality --out folder")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    args = parser.parse_args()
    results = args.folder / "runs.jsonl"
    if not results.exists():
        raise SystemExit(f"error: {results} not found: give the --out folder of a cl_quality run")
    print(table([json.loads(line) for line in results.read_text().splitlines()], args.split))


if __name__ == "__main__":
    main()
