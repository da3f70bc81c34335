"""Ray Data ingest: tokens per second of the tokenisation, and rows per second from a large file with the driver's memory.

Two measurements, one per mode:

- default: tokenizes the training splits of a stream (default: the standard stream, order1) with the embedded model's
  tokenizer through `pipeline.preprocess.tokenized_dataset` (Ray Data `map_batches` as Ray tasks, materialized here)
  three times on one fresh local Ray: the first pays for starting a worker process and importing transformers, the
  next ones run in the warm worker as a chain's later tasks do. Side by side, the same `TokenizeBatch` in a plain loop.
- `--rows 100000 1000000`: for each size, a generated file of that many rows (jsonl or parquet, 20 classes, not
  committed) goes through a stream's `file` source: read, sample (`pipeline.sampling`, fixed sizes) and tokenise
  the sampled train split, each size in a fresh driver process so that its peak memory is its own. Prints rows per
  second and the driver's peak resident memory above its start (imports and Ray up) for each size side by side,
  and their ratios: flat memory means a ratio near 1 while the rows grow 10x.

Prints a table, then one JSON line last (with the CPU).

    .venv/bin/python benchmarks/preprocess_throughput.py [--stream configs/streams/standard.yaml] [--max-length 256]
    .venv/bin/python benchmarks/preprocess_throughput.py --rows 100000 1000000 [--format parquet]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.hardware import cpu_name  # noqa: E402
from pipeline.memory import peak_resident_mib, resident_mib  # noqa: E402
from pipeline.models import ModelSpec  # noqa: E402
from pipeline.preprocess import count_tokens, tokenized_dataset  # noqa: E402
from pipeline.tokenizing import TokenizeBatch, TokenizerLoader  # noqa: E402

CLASSES = 20
WORDS = "account balance card transfer refund order payment limit travel alarm weather music reminder recipe flight " \
        "hotel python error install query table server branch merge".split()


def tokenisation(args: argparse.Namespace) -> dict:
    """Ray Data tokenisation against the same tokenizer in a plain loop, on a stream's training texts."""
    import ray

    from pipeline.streams import load_stream

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    texts = [pair for task in load_stream(args.stream, args.order) for pair in task.training_texts()]
    factory = TokenizerLoader.of(ModelSpec(name=args.model))
    ray_seconds = []
    for _ in range(3):
        started = time.perf_counter()
        dataset = tokenized_dataset(texts, factory, args.max_length).materialize()  # lazy until read: timed as a whole
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
    return {"benchmark": "preprocess_throughput", "examples": len(texts), "tokens": tokens,
            "ray_data_first_s": round(cold, 2), "ray_data_warm_s": round(warm, 2), "in_process_s": round(plain_seconds, 3),
            "ray_data_warm_tokens_per_s": tokens / warm, "in_process_tokens_per_s": tokens / plain_seconds,
            "ray_warm_over_in_process_time": warm / plain_seconds}


def _records(rows: int, chunk: int):
    """`rows` distinct (texts, labels) records, `chunk` at a time (the generator holds one chunk)."""
    rng = random.Random(0)
    for start in range(0, rows, chunk):
        texts = [f"request {i}: " + " ".join(rng.choices(WORDS, k=12)) for i in range(start, min(rows, start + chunk))]
        yield texts, [f"class_{rng.randrange(CLASSES)}" for _ in texts]


def write_rows(path: Path, rows: int, file_format: str, chunk: int = 50_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file_format == "parquet":
        with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("label", pa.string())])) as writer:
            for texts, labels in _records(rows, chunk):
                writer.write_table(pa.table({"text": texts, "label": labels}))
    else:
        with open(path, "w") as out:
            for texts, labels in _records(rows, chunk):
                out.write("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in zip(texts, labels)))


def measure_file(args: argparse.Namespace) -> dict:
    """One driver process: read + sample a file source, then tokenise the sampled train split; times and peak memory."""
    from pipeline.ray_workers import start_ray
    from pipeline.streams import load_stream

    start_ray(None, num_cpus=2)
    base_mib = resident_mib()
    started = time.perf_counter()
    [task] = load_stream(args.measure, "main")
    sampled = time.perf_counter()
    dataset = tokenized_dataset(task.training_texts(), TokenizerLoader.of(ModelSpec(name=args.model)), args.max_length)
    tokens = count_tokens(dataset)
    done = time.perf_counter()
    return {"sample_s": round(sampled - started, 2), "tokenise_s": round(done - sampled, 2), "tokens": tokens,
            "split_sizes": {split: len(rows) for split, rows in task.splits.items()},
            "driver_base_mib": round(base_mib, 1), "driver_peak_over_base_mib": round(peak_resident_mib() - base_mib, 1)}


def file_ingest(args: argparse.Namespace) -> dict:
    """Each size in its own driver process, side by side."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="ingest-") as folder:
        for rows in args.rows:
            data = Path(folder) / f"rows-{rows}.{args.format}"
            started = time.perf_counter()
            write_rows(data, rows, args.format)
            generated = time.perf_counter() - started
            stream = Path(folder) / f"stream-{rows}.yaml"
            stream.write_text(yaml.safe_dump({"name": "ingest", "seed": 0, "orders": {"main": ["big"]}, "tasks": [{
                "name": "big", "instruction": "What is the request about?", "source": {"type": "file", "path": data.name},
                "sizes": {"train": args.train, "validation": args.validation, "test": args.test}}]}))
            child = subprocess.run([sys.executable, __file__, "--measure", str(stream), "--model", args.model,
                                    "--max-length", str(args.max_length)], capture_output=True, text=True, check=False)
            if child.returncode:
                raise SystemExit(f"error: the {rows}-row measurement failed:\n{child.stderr[-3000:]}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result |= {"file_mib": round(data.stat().st_size / 2**20, 1), "generate_s": round(generated, 1),
                       "rows_per_s": round(rows / result["sample_s"])}
            results[rows] = result
            data.unlink()
    print(f"file source ({args.format}, {CLASSES} classes), sample train {args.train} / validation {args.validation} / test {args.test}, "
          f"{cpu_name()}")
    print(f"  {'rows':>9} {'file MiB':>9} {'read+sample s':>14} {'rows/s':>9} {'tokenise s':>11} {'driver peak over start MiB':>27}")
    for rows, r in results.items():
        print(f"  {rows:>9} {r['file_mib']:>9} {r['sample_s']:>14} {r['rows_per_s']:>9} {r['tokenise_s']:>11} {r['driver_peak_over_base_mib']:>27}")
    small, large = results[min(results)], results[max(results)]
    ratios = {"rows": max(results) / min(results),
              "driver_peak_over_base": large["driver_peak_over_base_mib"] / max(small["driver_peak_over_base_mib"], 1.0),
              "read_sample_seconds": large["sample_s"] / small["sample_s"]}
    print(f"  largest / smallest: rows x{ratios['rows']:.0f}, driver peak x{ratios['driver_peak_over_base']:.2f}, "
          f"read+sample time x{ratios['read_sample_seconds']:.1f}")
    return {"benchmark": "preprocess_throughput", "mode": "file", "format": args.format, "cpu": cpu_name(),
            "sizes": {"train": args.train, "validation": args.validation, "test": args.test},
            "per_rows": {str(rows): r for rows, r in results.items()}, "largest_over_smallest": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="configs/streams/standard.yaml")
    parser.add_argument("--order", default="order1")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rows", type=int, nargs="+", help="file-source mode: generated files of these many rows")
    parser.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    parser.add_argument("--train", type=int, default=2000, help="file-source mode: sampled sizes")
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one file-source measurement (a child process)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_file(args)))
    elif args.rows:
        print(json.dumps(file_ingest(args)))
    else:
        print(json.dumps(tokenisation(args) | {"cpu": cpu_name()}))


if __name__ == "__main__":
    main()
