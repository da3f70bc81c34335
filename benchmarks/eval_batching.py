"""Label scoring: whole prompts in input order vs the shared prefix once + batches by length, side by side.

    .venv/bin/python benchmarks/eval_batching.py              # SmolLM2-135M, demo val + test, bf16 autocast (~3 min)
    .venv/bin/python benchmarks/eval_batching.py --repeats 1  # one round (~1.5 min)

A batch of prompts is padded to its longest prompt, and padded positions cost as much compute as real
ones; and every prompt of a task starts with the task's instruction. Before (how the chain scored until
2026-11-29): each split of each task on its own, batches of `evaluation.batch_size` whole prompts in the
order the split lists them. Now (`pipeline.evaluation.label_log_likelihoods`, both splits of a task in
one call as `pipeline.scoring.score_tasks` does): the prefix all the task's prompts share runs once, and
the rest of each prompt is batched by length. Same model, prompts, batch size and precision as the
demo's evaluation; rounds alternate the two ways and the best round of each counts. Reports the prompt
tokens each way computes, the time ratio, and whether both pick the same label. One JSON line last.
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
from pipeline.evaluation import (  # noqa: E402
    _candidate_ids, _inference, _pad_id, _prompt_ids, _score_batch, _shared_prefix_length, label_log_likelihoods,
)
from pipeline.models import load_model_and_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("validation", "test")


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    return sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of both ways; the best round of each counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model, tokenizer = load_model_and_tokenizer(config.model)
    model.eval()
    batch = config.evaluation.batch_size
    tasks = select_tasks(config)

    def before() -> list[int]:
        predictions = []
        for task in tasks:
            candidates, pad_id = _candidate_ids(tokenizer, task.answers), _pad_id(tokenizer)
            for split in SPLITS:
                prompt_ids = _prompt_ids(tokenizer, task.prompts(split))
                with _inference(model):
                    for start in range(0, len(prompt_ids), batch):  # whole prompts, in the order given
                        predictions += _score_batch(model, prompt_ids[start : start + batch], candidates, pad_id).argmax(-1).tolist()
        return predictions

    def now() -> list[int]:
        predictions = []
        for task in tasks:
            prompts = [p for split in SPLITS for p in task.prompts(split)]
            predictions += label_log_likelihoods(model, tokenizer, prompts, task.answers, batch).argmax(-1).tolist()
        return predictions

    seconds: dict[str, float] = {"before": float("inf"), "now": float("inf")}
    predictions: dict[str, list[int]] = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.scores_in_bf16()):
        for _ in range(args.repeats):
            for name, score in (("before", before), ("now", now)):
                started = time.perf_counter()
                predictions[name] = score()
                seconds[name] = min(seconds[name], time.perf_counter() - started)
    gold = [task.answers.index(t) for task in tasks for split in SPLITS for t in task.targets(split)]

    real = tokens_before = tokens_now = 0
    for task in tasks:
        lengths = {split: [len(tokenizer(p).input_ids) for p in task.prompts(split)] for split in SPLITS}
        pooled = [ids for split in SPLITS for ids in _prompt_ids(tokenizer, task.prompts(split))]
        shared = _shared_prefix_length(pooled)
        real += sum(sum(v) for v in lengths.values())
        tokens_before += sum(padded_tokens(v, batch) for v in lengths.values())
        tokens_now += shared + padded_tokens(sorted(n - shared for v in lengths.values() for n in v), batch)
    examples = len(gold)
    same = sum(a == b for a, b in zip(predictions["before"], predictions["now"]))
    ratio = seconds["before"] / seconds["now"]
    accuracy = {name: sum(p == g for p, g in zip(predictions[name], gold)) / examples for name in predictions}
    print(f"{config.model.name}, {len(tasks)} tasks, {examples} examples (validation + test), batch {batch}, "
          f"{'bf16 autocast' if config.scores_in_bf16() else 'fp32'}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"prompt tokens computed: before {tokens_before}, now {tokens_now} (the prompts hold {real})")
    print(f"seconds: before {seconds['before']:.1f}, now {seconds['now']:.1f} -> {ratio:.2f}x; "
          f"same label for {same} of {examples} examples; accuracy {accuracy['before']:.3f} / {accuracy['now']:.3f}")
    print(json.dumps({
        "benchmark": "eval_batching",
        "model": config.model.name,
        "examples": examples,
        "batch_size": batch,
        "bf16": config.scores_in_bf16(),
        "threads": torch.get_num_threads(),
        "prompt_tokens_before": tokens_before,
        "prompt_tokens_now": tokens_now,
        "prompt_tokens_real": real,
        "before_s": round(seconds["before"], 2),
        "now_s": round(seconds["now"], 2),
        "ratio": round(ratio, 3),
        "same_labels": same,
        "accuracy_before": round(accuracy["before"], 4),
        "accuracy_now": round(accuracy["now"], 4),
    }))


if __name__ == "__main__":
    main()
