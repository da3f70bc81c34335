"""Scoring in fp32 vs under bf16 autocast, side by side, on the demo stream's real validation + test data.

    .venv/bin/python benchmarks/eval_precision.py                                    # base SmolLM2-135M (~4 min)
    .venv/bin/python benchmarks/eval_precision.py --adapter runs/demo-procl/adapter  # + a trained, merged adapter

The chain scores every seen task after every task, so on small tasks scoring is a large share of a
chain's time (`seconds/evaluation_share` on the chain's MLflow run). This measures what `evaluation.bf16`
buys on this CPU (AMX-bf16): the same label-scoring code (`pipeline.evaluation.classify`) on the same
prompts and batch size, fp32 then bf16 autocast, task by task; reports the speed ratio, how often the
two pick the same label, and each one's accuracy. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.chain import select_tasks  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluation import classify  # noqa: E402
from pipeline.models import load_model_and_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--adapter", type=Path, help="a peft adapter folder (e.g. a chain's exported adapter), merged before scoring")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model, tokenizer = load_model_and_tokenizer(config.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(args.adapter)).merge_and_unload()
    model.eval()
    batch = config.evaluation.batch_size

    rows, totals = [], {"fp32_s": 0.0, "bf16_s": 0.0, "examples": 0, "agree": 0, "fp32_correct": 0, "bf16_correct": 0}
    for task in select_tasks(config):
        prompts = task.prompts("validation") + task.prompts("test")
        gold = [task.answers.index(t) for t in task.targets("validation") + task.targets("test")]
        predictions, seconds = {}, {}
        for precision in ("fp32", "bf16"):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                predictions[precision] = classify(model, tokenizer, prompts, task.answers, batch)
            seconds[precision] = time.perf_counter() - started
        agree = sum(a == b for a, b in zip(predictions["fp32"], predictions["bf16"]))
        correct = {p: sum(x == g for x, g in zip(predictions[p], gold)) for p in predictions}
        rows.append({"task": task.name, "examples": len(prompts), "classes": len(task.answers),
                     "fp32_s": round(seconds["fp32"], 2), "bf16_s": round(seconds["bf16"], 2),
                     "ratio": round(seconds["fp32"] / seconds["bf16"], 2), "agreement": round(agree / len(prompts), 3),
                     "fp32_accuracy": round(correct["fp32"] / len(prompts), 3), "bf16_accuracy": round(correct["bf16"] / len(prompts), 3)})
        for key, value in (("fp32_s", seconds["fp32"]), ("bf16_s", seconds["bf16"]), ("examples", len(prompts)), ("agree", agree),
                           ("fp32_correct", correct["fp32"]), ("bf16_correct", correct["bf16"])):
            totals[key] += value
        print(rows[-1], flush=True)

    n = totals["examples"]
    summary = {"ratio": round(totals["fp32_s"] / totals["bf16_s"], 2), "agreement": round(totals["agree"] / n, 3),
               "fp32_accuracy": round(totals["fp32_correct"] / n, 3), "bf16_accuracy": round(totals["bf16_correct"] / n, 3)}
    print(f"\n{'task':<10} {'n':>4} {'K':>3} {'fp32 s':>7} {'bf16 s':>7} {'ratio':>6} {'agree':>6} {'acc fp32':>9} {'acc bf16':>9}")
    for r in rows:
        print(f"{r['task']:<10} {r['examples']:>4} {r['classes']:>3} {r['fp32_s']:>7.1f} {r['bf16_s']:>7.1f} {r['ratio']:>6.2f} "
              f"{r['agreement']:>6.3f} {r['fp32_accuracy']:>9.3f} {r['bf16_accuracy']:>9.3f}")
    print(f"{'all':<10} {n:>4} {'':>3} {totals['fp32_s']:>7.1f} {totals['bf16_s']:>7.1f} {summary['ratio']:>6.2f} "
          f"{summary['agreement']:>6.3f} {summary['fp32_accuracy']:>9.3f} {summary['bf16_accuracy']:>9.3f}")
    print(json.dumps({"benchmark": "eval_precision", "config": str(args.config), "adapter": str(args.adapter) if args.adapter else None,
                      "threads": args.threads, "batch_size": batch, **summary, "per_task": rows}))


if __name__ == "__main__":
    main()
