"""The markdown table of docs/RESULTS.md from a cl_quality folder's runs.jsonl.

    .venv/bin/python benchmarks/cl_table.py runs/cl_quality

The table is `procl report`'s (pipeline.report.markdown): one row per strategy, a column per order and
seed with that chain's final average accuracy / BWT, then mean +- std over the chains of AA, learning
accuracy (each task right after training it), BWT, forgetting and validation AA. `--split validation`
puts the validation matrices in the test's place; `--matrices` prints every chain's accuracy matrix
instead (docs/CL_MATRICES.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.report import ChainScores, markdown  # noqa: E402

LABELS = {"procl": "procl (residual, N 4)", "multitask": "multitask (upper bound)"}


def chains(records: list[dict], split: str) -> list[ChainScores]:
    """The runs.jsonl records as the report's chains (the standard stream)."""
    first, second = ("matrix", "validation_matrix") if split == "test" else ("validation_matrix", "matrix")
    return [ChainScores(f"{r['strategy']}-{r['order']}-{r['seed']}", r["strategy"], "standard", r["order"], str(r["seed"]),
                        r["strategy"], r["tasks"], r[first], r[second]) for r in records]


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
    print(matrices(records, args.split) if args.matrices else markdown(chains(records, args.split), LABELS))


if __name__ == "__main__":
    main()
