"""Method quality: every strategy on the standard stream, 3 orders x seeds, the same budget for all.

    nice -n 19 .venv/bin/python benchmarks/cl_quality.py --out runs/cl_quality   # CPU size (~4-5 min per chain idle, ~2.5 h: background it)
    .venv/bin/python benchmarks/cl_quality.py --out runs/clq-quick --quick   # 1 order, 1 seed, tiny Llama (~5 min)
    .venv/bin/python benchmarks/cl_quality.py --out runs/clq-big --train 400 --validation 80 --test 160 --seeds 0 1 2

Each run is one chain of the standard stream (configs/streams/standard.yaml, resized with --train /
--validation / --test) in one process with `run_bare` from pipeline_overhead.py: the pipeline's
tokenisation, strategy hooks, optimizer steps and scoring, without Ray's per-task start-up, so the
table fits on a 2-core CPU. Every strategy gets the same config (configs/demo.yaml's model, LoRA
settings, learning rate, steps) — no method is tuned on test data; the zero-shot row is scored once
per order and seed and shared. Each finished chain is logged, as the pipeline logs its chains, to the
MLflow store `<out>/mlflow.db` (run `<strategy>-<order>-seed<seed>`, its folder `<out>/<run name>/`) and
appended to `<out>/runs.jsonl` (timings, CPU and precision, ProCL's sorted slot plasticity); a re-run skips chains already
there (the run is resumable). Prints `procl report <out>`'s table, read back from the store (mean +- std
over orders and seeds of AA, LA, BWT and forgetting, test and validation), and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from cl_table import LABELS  # noqa: E402
from cl_table import chains as recorded_chains  # noqa: E402
from pipeline_overhead import run_bare  # noqa: E402

from pipeline.chain import log_recorded_chain, select_tasks  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.hardware import cpu_name  # noqa: E402
from pipeline.mlflow_store import default_tracking_uri  # noqa: E402
from pipeline.report import SUMMARY, markdown, read_chains  # noqa: E402
from procl import metrics  # noqa: E402

STRATEGIES = ["seq_lora", "inc_lora", "o_lora", "replay", "procl", "multitask"]
ORDERS = ["order1", "order2", "order3"]


def resized_stream(source: Path, out: Path, train: int, validation: int, test: int) -> Path:
    spec = yaml.safe_load(source.read_text())
    for task in spec["tasks"]:
        task["sizes"] = {"train": train, "validation": validation, "test": min(test, task["sizes"]["test"])}
    path = out / "stream.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sorted_plasticity(task_slot_usage: list[dict[str, list[float]]]) -> list[list[float]]:
    """Per ProCL task, each layer's mean slot plasticity rho-bar sorted high to low, averaged over layers.

    [1, 1, 1, 1] is routing that never differentiated (ProCL acting as seq_lora); [1, 0, 0, 0] keeps one
    slot per layer and pulls the others back to where the task started."""
    return [[round(statistics.mean(col), 3) for col in zip(*(sorted(u, reverse=True) for u in task.values()))]
            for task in task_slot_usage]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder (runs.jsonl; re-running resumes)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--stream", type=Path, default=ROOT / "configs" / "streams" / "standard.yaml",
                        help="the stream to resize and run (its tasks and orders)")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--orders", nargs="+", default=ORDERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train", type=int, default=64, help="training examples per task (16 steps of 4)")
    parser.add_argument("--validation", type=int, default=16)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-shot", type=Path, metavar="FILE",
                        help="zero-shot rows shared with other folders of the same model, stream and sizes (JSON by order and "
                             "seed; read, and written for what this run scores): cl_comparison.py's folders differ only in "
                             "strategy and lr, which the zero-shot row does not see")
    parser.add_argument("--quick", action="store_true", help="tiny Llama, order1, seed 0, 16/4/8 examples: checks the script")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. strategy.procl.tau=0.5")
    args = parser.parse_args()
    if args.quick:
        args.orders, args.seeds, args.train, args.validation, args.test = ["order1"], [0], 16, 4, 8
        args.overrides = ["model.name=tiny-llama", *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    # results of one folder must come from one setting: a resumed table refuses other sizes, overrides or
    # config contents (the resolved config, so an edit of the config file counts too)
    resolved = load_config(args.config, args.overrides).model_dump(mode="json", exclude={"run_name", "output_dir", "tracking", "ray"})
    settings = {"config": resolved, "sizes": [args.train, args.validation, args.test], "overrides": args.overrides}
    if args.stream.resolve() != (ROOT / "configs" / "streams" / "standard.yaml").resolve():
        settings["stream"] = yaml.safe_load(args.stream.read_text())  # (folders written before --stream had the standard one)
    settings_file = args.out / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise SystemExit(f"error: {args.out} holds results of other settings (see {settings_file}: config, sizes or overrides "
                         "differ); use another --out")
    settings_file.write_text(json.dumps(settings))
    stream = resized_stream(args.stream, args.out, args.train, args.validation, args.test)
    results_file = args.out / "runs.jsonl"
    done = {(r["strategy"], r["order"], r["seed"]): r for r in map(json.loads, results_file.read_text().splitlines())} \
        if results_file.exists() else {}

    tracking_uri = default_tracking_uri(args.out)
    # one worker's batches: the bare loop's optimizer step is num_workers x batch_size rows
    common = [f"stream.path={stream}", "scaling.num_workers=1", f"output_dir={args.out}", f"tracking.uri={tracking_uri}", *args.overrides]
    started = time.time()
    # what the zero-shot row depends on: a shared file written under other settings is refused
    scored_with = {"model": resolved["model"], "evaluation": resolved["evaluation"], "max_length": resolved["training"]["max_length"],
                   "sizes": settings["sizes"], "stream": yaml.safe_load(args.stream.read_text())}
    shared = json.loads(args.zero_shot.read_text()) if args.zero_shot and args.zero_shot.exists() else {"scored_with": scored_with}
    if shared["scored_with"] != scored_with:
        raise SystemExit(f"error: {args.zero_shot} holds zero-shot rows of another model, stream, sizes or scoring; use another file")
    for order in args.orders:
        for seed in args.seeds:
            zero_shot = shared.get(f"{order}/seed{seed}")  # None when not shared
            for name in args.strategies:
                if (name, order, seed) in done:
                    zero_shot = done[(name, order, seed)]["zero_shot"]
                    continue
                config = load_config(args.config, [*common, f"stream.order={order}", f"training.seed={seed}", f"strategy.name={name}",
                                                   f"run_name={name}-{order}-seed{seed}"])
                tasks = select_tasks(config)
                run_started = time.time()
                result = run_bare(config, tasks, args.threads, config.run_folder().local_path, zero_shot=zero_shot)
                zero_shot = result["zero_shot"]
                if args.zero_shot and f"{order}/seed{seed}" not in shared:
                    shared[f"{order}/seed{seed}"] = zero_shot
                    args.zero_shot.write_text(json.dumps(shared))
                log_recorded_chain(config, result["manifest"], tracking_uri)
                record = {"strategy": name, "order": order, "seed": seed, "tasks": [t.name for t in tasks],
                          "matrix": result["matrix"], "validation_matrix": result["validation_matrix"], "zero_shot": zero_shot,
                          "seconds": round(time.time() - run_started, 1),
                          "train_s": round(sum(t["train_s"] for t in result["per_task"]), 1),
                          "eval_s": round(result["zero_shot_s"] + sum(t["eval_s"] for t in result["per_task"]), 1),
                          # precision "auto" follows the CPU, which changes between sessions of a long run
                          "cpu": cpu_name(), "bf16": config.on_device("cpu").deepspeed.bf16}
                if result["task_slot_usage"]:
                    record["sorted_plasticity"] = sorted_plasticity(result["task_slot_usage"])
                with results_file.open("a") as out:
                    out.write(json.dumps(record) + "\n")
                done[(name, order, seed)] = record
                summary = metrics.summary(record["matrix"])
                print(f"{name:<10} {order} seed {seed}: AA {summary['average_accuracy']:.3f}  BWT {summary['backward_transfer']:+.3f}  "
                      f"({record['seconds']:.0f} s)" + (f"  sorted plasticity {record['sorted_plasticity']}" if "sorted_plasticity" in record else ""),
                      flush=True)

    # the table as `procl report <out>` prints it: from the MLflow store, not from runs.jsonl; chains the store lacks
    # (a results folder continued on a fresh checkout keeps runs.jsonl, not the store) are tabled from runs.jsonl
    stored = read_chains(tracking_uri) if MlflowClient(tracking_uri).get_experiment_by_name("procl") else []
    chains = [c for c in stored if c.label in args.strategies and c.order in args.orders and int(c.seed) in args.seeds]
    logged = {(c.label, c.order, int(c.seed)) for c in chains}
    missing = [key for key in done if key not in logged and key[0] in args.strategies and key[1] in args.orders and key[2] in args.seeds]
    if missing:
        print(f"{len(missing)} chain(s) of runs.jsonl are not in {tracking_uri}: the table has them from runs.jsonl")
        chains += recorded_chains([done[key] for key in missing], "test")
    print("\n" + markdown(chains, LABELS))
    rows = {}
    for name in args.strategies:
        mine = [c for c in chains if c.label == name]
        rows[name] = {"runs": len(mine), **{f"test_{k}": [c.summary("test")[k] for c in mine] for k in SUMMARY},
                      "validation_average_accuracy": [c.summary("validation")["average_accuracy"] for c in mine]}
    print(json.dumps({"benchmark": "cl_quality", "orders": args.orders, "seeds": args.seeds,
                      "sizes": {"train": args.train, "validation": args.validation, "test": args.test},
                      "overrides": args.overrides, "seconds": round(time.time() - started, 1), "per_strategy": rows}))


if __name__ == "__main__":
    main()
