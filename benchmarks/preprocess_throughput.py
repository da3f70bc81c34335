"""Tokens per second of the Ray Data preprocessing, side by side with the same tokenization in-process.

Tokenizes the training splits of a stream (default: the standard stream, order1) with the
embedded model's tokenizer through `pipeline.preprocess.tokenized_dataset` (Ray Data `map_batches`
as Ray tasks, then materialize) three times on one fresh local Ray: the first pays for starting a
worker process and importing transformers, the next ones run in the warm worker as a chain's later
tasks do. Side by side, the same `TokenizeBatch` in a plain loop. Prints a table, then one JSON line last.

    .venv/bin/python benchmarks/preprocess_throughput.py [--stream configs/streams/standard.yaml] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import numpy as np
import ray

from pipeline.models import ModelSpec, load_tokenizer
from pipeline.preprocess import TokenizeBatch, count_tokens, tokenized_dataset
from pipeline.streams import load_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", default="configs/streams/standard.yaml")
    parser.add_argument("--order", default="order1")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    texts = [pair for task in load_stream(args.stream, args.order) for pair in task.training_texts()]
    factory = partial(load_tokenizer, ModelSpec(name=args.model))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    ray_seconds = []
    for _ in range(3):
        started = time.perf_counter()
        dataset = tokenized_dataset(texts, factory, args.max_length)
        ray_seconds.append(time.perf_counter() - started)
    tokens = count_tokens(dataset)
    cold, warm = ray_seconds[0], min(ray_seconds[1:])

    tokenize = TokenizeBatch(factory, args.max_length)
    started = time.perf_counter()
    in_process_tokens = 0
    for start in range(0, len(texts), 64):
        chunk = texts[start : start + 64]
        rows = tokenize({"prompt": np.array([p for p, _ in chunk]), "continuation": np.array([c for _, c in chunk])})
        in_process_tokens += int(rows["attention_mask"].sum())
    plain_seconds = time.perf_counter() - started
    ray.shutdown()
    assert tokens == in_process_tokens, (tokens, in_process_tokens)

    print(f"{len(texts)} training examples, {tokens} tokens (max_length {args.max_length})")
    print(f"  Ray Data, first dataset:            {cold:7.2f} s  {tokens / cold:10.0f} tokens/s (incl. worker start-up and imports)")
    print(f"  Ray Data, warm worker (best of 2):  {warm:7.2f} s  {tokens / warm:10.0f} tokens/s")
    print(f"  same tokenizer, plain loop:         {plain_seconds:7.2f} s  {tokens / plain_seconds:10.0f} tokens/s")
    print(json.dumps({
        "benchmark": "preprocess_throughput", "examples": len(texts), "tokens": tokens,
        "ray_data_first_s": round(cold, 2), "ray_data_warm_s": round(warm, 2), "in_process_s": round(plain_seconds, 3),
        "ray_data_warm_tokens_per_s": tokens / warm, "in_process_tokens_per_s": tokens / plain_seconds,
        "ray_warm_over_in_process_time": warm / plain_seconds,
    }))


if __name__ == "__main__":
    main()
