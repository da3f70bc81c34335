"""Host memory the models take in a training worker, over a demo chain on SmolLM2, in model copies.

    .venv/bin/python benchmarks/worker_memory.py            # 4 tasks: configs/demo.yaml on the topics stream (~8 min)
    .venv/bin/python benchmarks/worker_memory.py --quick    # its first 2 tasks
    .venv/bin/python benchmarks/worker_memory.py --set scaling.num_workers=1

Runs the chain through `pipeline.chain.run_chain` (local Ray, Ray Data, Ray Train + DeepSpeed, MLflow).
Each training worker records its resident memory once its imports are done and before it loads any
model, its peak resident memory after each task, and the size of one copy of the base model in the
dtype it holds it in (`pipeline.memory.WorkerMemory`, kept per task in the manifest). The figure is

    model_memory_over_model_copy = (peak - before the first model load) / one model copy

of the worker (and task) where it is largest: 1 means the worker never held more than one copy of the
model plus small change; each model held beside another, or freed memory the allocator keeps, adds to
it (target: at most 1.3). Per-task wall times (whole task, training, evaluation) are printed beside it.
The CPU is recorded. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipeline.chain import run_chain  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.hardware import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["stream.path=configs/streams/topics.yaml", "stream.order=order1"]  # configs/demo.yaml's settings on 4 tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the first 2 tasks only")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    os.chdir(ROOT)  # stream paths in configs are relative to the repository root
    overrides = DEMO + (["stream.max_tasks=2"] if args.quick else []) + args.overrides

    with tempfile.TemporaryDirectory(prefix="procl-worker-memory-") as tmp:
        config = load_config(args.config, [*overrides, "run_name=worker-memory", f"output_dir={tmp}/runs"])
        result = run_chain(config)
        manifest = json.loads((result.run_folder.local_path / "manifest.json").read_text())

    rows = [{"task": record["name"], **record["memory"], **{f"{phase}_s": s for phase, s in record["seconds"].items()}}
            for record in manifest["tasks"]]
    print(f"\n{'task':<12} {'before models':>13} {'peak':>8} {'model copy':>10} {'copies':>7} {'task s':>7} {'train s':>8} {'eval s':>7}")
    for row in rows:
        print(f"{row['task']:<12} {row['before_models_mib']:>9.0f} MiB {row['peak_mib']:>4.0f} MiB {row['model_copy_mib']:>6.0f} MiB "
              f"{row['models_over_copy']:>7.2f} {row['task_s']:>7.1f} {row['train_s']:>8.1f} {row['evaluate_s']:>7.1f}")
    worst = max(rows, key=lambda row: row["models_over_copy"])
    print(f"\nmodels in a training worker at their peak: {worst['models_over_copy']:.2f} model copies "
          f"({worst['peak_mib'] - worst['before_models_mib']:.0f} MiB over one copy of {worst['model_copy_mib']:.0f} MiB; target <= 1.3)")
    print(json.dumps({
        "benchmark": "worker_memory",
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "config": str(args.config),
        "overrides": overrides,
        "quick": args.quick,
        "model": config.model.name,
        "num_workers": config.scaling.num_workers,
        "zero_stage": config.deepspeed.zero_stage,
        "per_task": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for row in rows],
        "model_memory_over_model_copy": round(worst["models_over_copy"], 3),
        "target": 1.3,
    }))


if __name__ == "__main__":
    main()
