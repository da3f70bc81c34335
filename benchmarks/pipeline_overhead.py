"""Pipeline overhead: the chain through Ray Data + Ray Train + DeepSpeed vs a bare single-process torch loop.

    .venv/bin/python benchmarks/pipeline_overhead.py                 # configs/demo.yaml (~10-20 min)
    .venv/bin/python benchmarks/pipeline_overhead.py --quick         # 2 tasks on tiny-llama (~2-3 min)
    .venv/bin/python benchmarks/pipeline_overhead.py --config C.yaml --set strategy.name=seq_lora

Both sides run in one invocation, one after the other, on the same config: the same model, stream,
strategy, optimizer steps (num_workers x batch_size rows per step, the same gradient clipping), the
same strategy hooks and the same evaluation (`pipeline.scoring`, on validation + test of every task
seen so far, after each task, plus the zero-shot row and the adapter export).

- pipeline: `pipeline.chain.run_chain` as `python -m pipeline run` does it, in a fresh local Ray
  (one Ray Train worker group of 2 workers x 1 CPU for the whole chain, gloo, DeepSpeed, scoring
  sharded over the workers, zero-shot row and export in the same worker group) with MLflow.
- bare: one process, torch threads = num_workers x cpus_per_worker (2 here), model loaded once;
  per task the same tokenisation (`TokenizeBatch`), each optimizer step over num_workers micro-batches
  of batch_size rows (gradients averaged: the data-parallel gradient), torch AdamW, the hooks, then
  scoring the same model with its adapters (as the pipeline's workers do).

Where the pipeline's time goes is measured without touching the pipeline: the benchmark wraps
driver-side calls (Ray init, the task datasets' set-up, TorchTrainer.fit, MLflow logging) and, inside the
Ray Train workers (wrappers shipped with the job), DeepSpeed init_distributed, the base model's load
(once per chain), the zero-shot scoring, each task's adapter attach, deepspeed.initialize, the waits for batches
(the tokenisation streams into them), after_task, scoring and reports,
and the export. A task's pipeline time is the driver's: from the previous task's
results (the start of training for the first) to this task's. Prints tables, then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK = ["stream.max_tasks=2", "model.name=tiny-llama"]


# -- instrumentation shipped into Ray Train workers (pickled by value) ---------------------------------


def _append(log_path: str, record: dict) -> None:
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def make_timed_train_chain(log_path: str):
    """The pipeline's `train_chain`, with timed calls written to `log_path` (one JSON line per rank):
    [name, task index, start, seconds] for the base model's load, and the adapter attach, deepspeed.initialize,
    batch waits, after_task, scoring and reports of every task (task None: the zero-shot row), the export, and
    the loop's entry and exit."""

    def timed_train_chain(loop_config):
        import time

        import ray.train

        import pipeline.train_worker as tw

        calls: list = []
        current = {"task": None}
        marks = {"entry": time.time()}

        def timed(name, fn):
            def inner(*args, **kwargs):
                start = time.time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    calls.append([name, current["task"], start, time.time() - start])
            return inner

        original = {name: getattr(tw, name) for name in ("init_deepspeed", "load_base_model", "attach_strategy", "_report", "score", "task_shard",
                                                        "_report_export")}

        def timed_init_deepspeed(use_gpu):
            deepspeed = timed("init_distributed", original["init_deepspeed"])(use_gpu)
            initialize = deepspeed.initialize
            deepspeed.initialize = timed("deepspeed_initialize", initialize)
            marks["_restore"] = (deepspeed, initialize)
            return deepspeed

        planned = iter([entry["index"] for entry in loop_config["plan"]])

        def attach_strategy(*args, **kwargs):  # a task's first step (and the export's)
            if current["task"] != "export":
                current["task"] = next(planned)
            model, strategy = timed("attach", original["attach_strategy"])(*args, **kwargs)
            strategy.after_task = timed("after_task", strategy.after_task)
            return model, strategy

        class Shard:  # counts the time the loop waits for batches
            def __init__(self, shard, index):
                self.shard, self.index = shard, index

            def iter_torch_batches(self, **kwargs):
                batches = iter(self.shard.iter_torch_batches(**kwargs))
                while True:
                    start = time.time()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        return
                    finally:
                        calls.append(["batch_wait", self.index, start, time.time() - start])
                    yield batch

        rank = ray.train.get_context().get_world_rank()
        tw.task_shard = lambda task_index: Shard(original["task_shard"](task_index), task_index)
        tw.init_deepspeed = timed_init_deepspeed
        tw.load_base_model = timed("model_load", original["load_base_model"])
        tw.attach_strategy = attach_strategy
        tw._report = timed("report", original["_report"])
        tw.score = timed("score", original["score"])

        def report_export(*args, **kwargs):
            current["task"] = "export"
            return timed("export", original["_report_export"])(*args, **kwargs)

        tw._report_export = report_export
        try:
            tw.train_chain(loop_config)  # the real worker loop
        finally:
            for name, fn in original.items():
                setattr(tw, name, fn)
            if "_restore" in marks:
                deepspeed, initialize = marks.pop("_restore")
                deepspeed.initialize = initialize
            marks["exit"] = time.time()
            _append(log_path, {"kind": "train_worker", "rank": rank, "pid": os.getpid(), "calls": calls, **marks})

    return timed_train_chain


# -- the pipeline side ---------------------------------------------------------------------------------


class Recorder:
    """Driver-side wall-clock spans, tagged with the task being trained."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.events: list[dict] = []
        self.task: int | None = None

    def wrap(self, kind: str, fn, **tags):
        def inner(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append({"kind": kind, "task": self.task, "start": start, "end": time.time(), **tags})
        return inner


def run_pipeline(config, log_path: str) -> dict:
    """run_chain with driver and worker instrumentation; returns the spans and the manifest."""
    import ray
    from ray.train.torch import TorchTrainer

    import pipeline.chain as chain
    import pipeline.preprocess as preprocess
    import pipeline.train_worker as train_worker
    import pipeline.tracking as tracking

    rec = Recorder(log_path)
    saved = [(chain, "init_ray"), (preprocess, "tokenized_dataset"), (train_worker, "train_chain"),
             (TorchTrainer, "fit"), (tracking.ChainTracker, "log_task"), (tracking.ChainTracker, "start")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in saved]
    originals = {name: fn for _, name, fn in saved}

    def log_task(tracker, index, *args, **kwargs):
        rec.task = index
        return rec.wrap("mlflow_log_task", originals["log_task"])(tracker, index, *args, **kwargs)

    chain.init_ray = rec.wrap("ray_init", originals["init_ray"])
    preprocess.tokenized_dataset = rec.wrap("ray_data", originals["tokenized_dataset"])
    train_worker.train_chain = make_timed_train_chain(log_path)
    TorchTrainer.fit = rec.wrap("fit", originals["fit"])
    tracking.ChainTracker.log_task = log_task
    tracking.ChainTracker.start = rec.wrap("mlflow_start", originals["start"])
    try:
        start = time.time()
        result = chain.run_chain(config)
        end = time.time()
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        ray.shutdown()
    manifest = json.loads((result.run_folder.local_path / "manifest.json").read_text())
    return {"start": start, "end": end, "events": rec.events, "manifest": manifest, "matrix": result.matrix, "summary": result.summary}


def pipeline_breakdown(run: dict, log_path: str, names: list[str]) -> dict:
    """Per-task and chain-level phases of the pipeline run, in seconds (rank 0's view of the worker loop)."""
    logs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    workers = sorted((r for r in logs if r["kind"] == "train_worker"), key=lambda r: r["rank"])
    events = run["events"]
    zero = workers[0] if workers else {"calls": []}

    def spans(kind, task=None, **tags):
        return [e for e in events if e["kind"] == kind and (task is None or e["task"] == task) and all(e.get(k) == v for k, v in tags.items())]

    def worker_calls(name, index):
        return [c for c in zero["calls"] if c[0] == name and c[1] == index]

    per_task = []
    for index, name in enumerate(names):
        loads = worker_calls("attach", index)
        if not loads:
            continue
        waits = worker_calls("batch_wait", index)
        initialize, after, report, score = (worker_calls(n, index) for n in ("deepspeed_initialize", "after_task", "report", "score"))
        task_start, task_end = loads[0][2], report[-1][2] + report[-1][3]
        phases = {
            "attach_s": sum(c[3] for c in loads),
            "deepspeed_initialize_s": sum(c[3] for c in initialize),
            # first batch -> after_task, batch waits included
            "train_loop_s": after[0][2] - (initialize[-1][2] + initialize[-1][3]),
            "first_batch_wait_s": waits[0][3] if waits else 0.0,
            "data_wait_s": sum(c[3] for c in waits),
            "after_task_s": sum(c[3] for c in after),
            "score_s": sum(c[3] for c in score),
            "report_s": sum(c[3] for c in report),
            "batches": len(waits) - 1,  # the last wait ends the iteration
            "worker_task_s": task_end - task_start,
            "mlflow_s": sum(e["end"] - e["start"] for e in spans("mlflow_log_task", index)[:1]),  # a second call logs the adapter
        }
        per_task.append({"task": name, **phases})

    fit = spans("fit")
    first_load = min((c[2] for c in zero["calls"] if c[0] == "attach"), default=math.nan)
    chain_level = {
        "ray_init_s": sum(e["end"] - e["start"] for e in spans("ray_init")),
        "mlflow_start_s": sum(e["end"] - e["start"] for e in spans("mlflow_start")),
        "ray_data_s": sum(e["end"] - e["start"] for e in spans("ray_data")),
        "fit_s": sum(e["end"] - e["start"] for e in fit),
        "fit_start_up_s": (min(w["entry"] for w in workers) - fit[0]["start"]) if workers and fit else 0.0,  # controller, worker actors, imports
        "init_distributed_s": sum(c[3] for c in zero["calls"] if c[0] == "init_distributed"),
        "fit_tear_down_s": (fit[-1]["end"] - max(w["exit"] for w in workers)) if workers and fit else 0.0,
        "worker_entry_to_first_task_s": first_load - zero.get("entry", first_load),
        "zero_shot_s": sum(c[3] for c in worker_calls("score", None)),
        "model_load_s": sum(c[3] for c in worker_calls("model_load", None)),
        "export_s": sum(c[3] for c in worker_calls("export", "export")),
    }
    return {"per_task": per_task, "chain": chain_level}


# -- the bare side -------------------------------------------------------------------------------------


def run_bare(config, tasks, threads: int, out_dir: Path, zero_shot: dict | None = None) -> dict:
    """The same chain in one process: one model, plain torch AdamW, the same hooks and evaluation.

    Records the chain as the pipeline's driver does, in `out_dir`: each task's strategy state under
    `tasks/task_<i>`, the adapter under `bare-adapter` and the manifest (`result["manifest"]`, which
    `pipeline.chain.log_recorded_chain` logs to MLflow). `zero_shot` (test and validation scores of the
    untrained model) skips scoring it again."""
    import numpy as np
    import torch

    from pipeline.manifest import Manifest, TaskRecord
    from pipeline.storage import RunFolder
    from pipeline.scoring import score_tasks
    from pipeline.models import load_model_and_tokenizer
    from pipeline.preprocess import TrainingCollate
    from pipeline.tokenizing import TokenizeBatch
    from procl import make_strategy, metrics
    from procl.checkpoint import recorded_sha256, save_strategy_state

    torch.set_num_threads(threads)
    config = config.on_device("cpu")  # precision settled as the workers settle it
    start = time.time()
    t = time.time()
    model, tokenizer = load_model_and_tokenizer(config.model)
    model_load_s = time.time() - t

    def evaluate(scored_model, seen) -> dict[str, dict[str, float]]:
        return score_tasks(scored_model, tokenizer, seen, config)  # exactly the pipeline's scoring

    t = time.time()
    shared_zero_shot = zero_shot is not None
    zero_shot = zero_shot or evaluate(model, tasks)
    zero_shot_s = time.time() - t
    manifest = Manifest(config.fingerprint(), [task.name for task in tasks], zero_shot=zero_shot,
                        zero_shot_seconds=None if shared_zero_shot else zero_shot_s,  # a shared row: no share of this chain's time
                        mlflow_run_id=_logged_run_id(out_dir))

    strategy = make_strategy(config.strategy.name, seed=config.training.seed, **config.strategy.options())
    model = strategy.build(model)
    collate = TrainingCollate.for_training(model, config.training)  # as the pipeline's workers
    tokenize = TokenizeBatch(lambda: tokenizer, config.training.max_length, config.training.mask_prompt)
    workers, micro, accumulation = config.scaling.num_workers, config.training.batch_size, config.training.gradient_accumulation
    plain_lora = config.exports_plain_lora()
    per_task = []
    for index, task in enumerate(tasks):
        task_start = time.time()
        examples = strategy.training_examples(index, [list(pair) for pair in task.training_texts()])
        rows = tokenize({"prompt": np.array([e[0] for e in examples], dtype=object),
                         "continuation": np.array([e[1] for e in examples], dtype=object)})
        tokenize_s = time.time() - task_start

        t = time.time()
        strategy.before_task(model, index)
        torch.manual_seed(config.training.seed + index)
        optimizer = torch.optim.AdamW(strategy.param_groups(model, config.training.lr), lr=config.training.lr,
                                      weight_decay=config.training.weight_decay)
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        losses: list[float] = []  # per optimizer step, the task loss averaged over its micro-batches (as train/loss)
        micro_losses: list[float] = []
        # Ray Train splits the rows equally over the workers (equal=True drops the remainder); each worker
        # iterates its shard in micro-batches of batch_size (the last one may be short)
        shard = len(examples) // workers
        per_worker = math.ceil(shard / micro)
        steps = 0
        for epoch in range(config.training.epochs):
            # each worker's shard in a seeded order per epoch, as the workers' local shuffle (not the same permutation)
            rng = np.random.default_rng(np.random.SeedSequence([config.training.seed, index, epoch]))
            order = [w * shard + (rng.permutation(shard) if config.training.shuffle_buffer else np.arange(shard)) for w in range(workers)]
            optimizer.zero_grad()
            for k in range(per_worker):
                for w in range(workers):
                    picked = order[w][k * micro : min((k + 1) * micro, shard)]
                    batch = collate({name: rows[name][picked] for name in rows})
                    with strategy.micro_batch(model, batch.pop("segments")):  # as pipeline.runtime.train_steps
                        # deepspeed.bf16 as torch autocast: same loss curve, same speed-up (benchmarks/precision.py)
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.deepspeed.bf16):
                            loss = model(**batch, use_cache=False).loss
                        extra = strategy.extra_loss(model)
                        ((loss if extra is None else loss + extra) / (workers * accumulation)).backward()
                    micro_losses.append(loss.item())
                if (k + 1) % accumulation:
                    continue
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad()
                strategy.after_optimizer_step(model)
                steps += 1
                losses.append(sum(micro_losses) / len(micro_losses))
                micro_losses.clear()
        strategy.after_task(model, index, examples)
        state_dir = save_strategy_state(strategy, model, out_dir / "tasks" / f"task_{index}")  # the pipeline's checkpoint
        train_s = time.time() - t

        t = time.time()
        scores = evaluate(model, tasks[: index + 1])
        eval_s = time.time() - t
        task_s = time.time() - task_start
        per_task.append({"task": task.name, "tokenize_s": tokenize_s, "train_s": train_s, "eval_s": eval_s, "steps": steps,
                         "task_s": task_s, "test": scores["test"]})
        manifest.record(TaskRecord(index, task.name, str(state_dir), recorded_sha256(state_dir), scores["test"],
                                   scores["validation"], losses, seconds={"task": task_s, "evaluate": eval_s, "train": task_s - eval_s},
                                   ended_at=time.time(), train_examples=len(examples)))

    t = time.time()
    if plain_lora:  # the reference MLP variant has no plain-LoRA export
        strategy.export(model, out_dir / "bare-adapter")
        manifest.adapter_dir = str(out_dir / "bare-adapter")
    export_s = time.time() - t
    manifest.save(RunFolder.at(out_dir))
    total = time.time() - start
    matrix, validation_matrix = manifest.matrix("test"), manifest.matrix("validation")
    return {"total_s": total, "model_load_s": model_load_s, "zero_shot_s": zero_shot_s, "export_s": export_s,
            "per_task": per_task, "matrix": matrix, "validation_matrix": validation_matrix, "zero_shot": zero_shot,
            "summary": metrics.summary(matrix), "task_slot_usage": getattr(strategy, "task_slot_usage", []), "manifest": manifest}


def _logged_run_id(run_dir: Path) -> str | None:
    """The MLflow chain run of an earlier recording of this chain (a re-run after a stop logs into it, not a second run)."""
    from pipeline.manifest import MANIFEST

    path = run_dir / MANIFEST
    return json.loads(path.read_text()).get("mlflow_run_id") if path.is_file() else None


# -- report ----------------------------------------------------------------------------------------------


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    cells = [[c if isinstance(c, str) else (f"{c:.1f}" if isinstance(c, float) else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="run config (default configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--quick", action="store_true", help=f"sanity run: --set {' --set '.join(QUICK)}")
    parser.add_argument("--bare-threads", type=int, nargs="+", default=None, metavar="N",
                        help="torch threads of the bare loop (default: num_workers x cpus_per_worker); several values run it once "
                             "each, the ratio uses the first")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (default: a temporary folder, deleted)")
    args = parser.parse_args()

    import torch

    from pipeline.chain import select_tasks, steps_per_task
    from pipeline.config import load_config
    from pipeline.hardware import cpu_name

    work = Path(tempfile.mkdtemp(prefix="pipeline-overhead-"))
    log_path = str(work / "phases.jsonl")
    overrides = (QUICK if args.quick else []) + args.overrides + [f"output_dir={work / 'runs'}", "run_name=overhead"]
    config = load_config(args.config, overrides)
    os.chdir(ROOT)  # stream paths in configs are relative to the repository root
    tasks = select_tasks(config)
    names = [task.name for task in tasks]
    threads = max(1, int(config.scaling.num_workers * config.scaling.cpus_per_worker))
    bare_threads = args.bare_threads or [threads]

    load = {"before": os.getloadavg()[0]}
    try:
        pipeline_run = run_pipeline(config, log_path)
        load["after_pipeline"] = os.getloadavg()[0]
        pipeline_s = pipeline_run["end"] - pipeline_run["start"]
        breakdown = pipeline_breakdown(pipeline_run, log_path, names)
        bare_runs = [run_bare(config, tasks, n, work) for n in bare_threads]
        load["after_bare"] = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    bare, threads = bare_runs[0], bare_threads[0]
    bare_s = bare["total_s"]
    manifest = pipeline_run["manifest"]
    per_task = []
    for p, b, record in zip(breakdown["per_task"], bare["per_task"], manifest["tasks"]):
        # the driver's view: from the previous task's results (or the start of training) to this task's
        per_task.append({"task": p["task"], "pipeline_s": round(record["seconds"]["task"], 2), "bare_s": round(b["task_s"], 2),
                         "steps": b["steps"], "pipeline_steps": len(record["losses"]),  # a loss per optimizer step
                         "planned_steps": steps_per_task(config, len(tasks[len(per_task)].splits["train"])),
                         "pipeline": {k: round(v, 2) if isinstance(v, float) else v for k, v in p.items() if k != "task"},
                         "bare": {k: round(v, 2) for k, v in b.items() if k not in ("task", "test", "steps")}})

    print(f"\n{config.model.name} ({config.model.dtype}), {config.strategy.name}, {len(tasks)} tasks, "
          f"ZeRO-{config.deepspeed.zero_stage}, batch {config.training.batch_size} x {config.scaling.num_workers} workers per step")
    print(f"pipeline: Ray Train {config.scaling.num_workers} workers x {config.scaling.cpus_per_worker:g} CPU, one worker group for "
          f"the chain, scoring sharded over the workers; bare: 1 process, {threads} torch threads. Same machine, same run, one after the other.")
    _table("per task (s): pipeline vs bare", ["task", "steps", "pipeline", "bare", "ratio", "p.loop", "b.train", "p.score", "b.eval"],
           [[t["task"], t["steps"], t["pipeline_s"], t["bare_s"], f"{t['pipeline_s'] / t['bare_s']:.2f}",
             t["pipeline"].get("train_loop_s", math.nan), t["bare"]["train_s"], t["pipeline"].get("score_s", math.nan), t["bare"]["eval_s"]]
            for t in per_task])
    columns = ("attach_s", "deepspeed_initialize_s", "train_loop_s", "data_wait_s", "after_task_s", "score_s", "report_s", "mlflow_s")
    _table("pipeline: where each task's time goes in the worker loop (rank 0) and the driver (s)",
           ["task", "attach", "ds init", "loop", "(data wait)", "after_task", "score", "report", "mlflow"],
           [[t["task"], *(t["pipeline"].get(k, math.nan) for k in columns)] for t in per_task])
    chain_level = {k: round(v, 2) for k, v in breakdown["chain"].items()}
    print("\nchain level (s): " + ", ".join(f"{k} {v}" for k, v in chain_level.items()))
    print(f"bare chain level (s): model_load {bare['model_load_s']:.1f}, zero_shot {bare['zero_shot_s']:.1f}, export {bare['export_s']:.1f}")
    fixed = {  # the pipeline's costs a single process does not pay, over the chain
        "fit_start_up_s": chain_level.get("fit_start_up_s", 0),
        "fit_tear_down_s": chain_level.get("fit_tear_down_s", 0),
        "ray_data_s": chain_level.get("ray_data_s", 0),
        "worker_model_load_s": chain_level.get("model_load_s", 0),
        "adapter_attach_s": sum(t["pipeline"].get("attach_s", 0) for t in per_task),
        "init_distributed_s": chain_level.get("init_distributed_s", 0),
        "deepspeed_initialize_s": sum(t["pipeline"].get("deepspeed_initialize_s", 0) for t in per_task),
        "mlflow_s": sum(t["pipeline"].get("mlflow_s", 0) for t in per_task) + chain_level.get("mlflow_start_s", 0),
        "ray_init_s": chain_level.get("ray_init_s", 0),
    }
    fixed["first_batch_wait_s"] = sum(t["pipeline"].get("first_batch_wait_s", 0) for t in per_task)
    fixed = {k: round(v, 1) for k, v in sorted(fixed.items(), key=lambda kv: -kv[1])}
    fixed_total = sum(fixed.values())
    print("pipeline fixed costs over the chain (s), largest first: " + ", ".join(f"{k} {v}" for k, v in fixed.items()))
    mismatched = [t["task"] for t in per_task if t["pipeline_steps"] != t["steps"]]
    if mismatched:
        print(f"WARNING: the bare loop ran a different number of optimizer steps than the pipeline on {mismatched}")
    ratio = pipeline_s / bare_s
    # what the ratio would be if the pipeline's training and scoring ran exactly as fast as the bare loop's
    # (same work; on a shared machine they differ with the other load): bare + the pipeline-only costs
    ratio_fixed_only = (bare_s + fixed_total) / bare_s
    print(f"pipeline-only costs {fixed_total:.1f} s in all; ratio if the compute ran at the bare loop's speed: {ratio_fixed_only:.2f}")
    print(f"1-min load average: before {load['before']:.1f}, after the pipeline {load['after_pipeline']:.1f}, "
          f"after the bare loop {load['after_bare']:.1f} (2 cores; other work on the machine skews the comparison)")
    for n, other in list(zip(bare_threads, bare_runs))[1:]:
        print(f"bare loop with {n} torch thread(s): {other['total_s']:.1f} s (ratio {pipeline_s / other['total_s']:.2f}); per task "
              + ", ".join(f"{t['task']} train {t['train_s']:.1f} eval {t['eval_s']:.1f}" for t in other["per_task"])
              + f"; zero-shot {other['zero_shot_s']:.1f}")
    print(f"\ntotal: pipeline {pipeline_s:.1f} s, bare {bare_s:.1f} s, ratio {ratio:.2f} (target <= 1.3); "
          f"final average accuracy pipeline {pipeline_run['summary']['average_accuracy']:.3f}, bare {bare['summary']['average_accuracy']:.3f}")
    print(json.dumps({
        "benchmark": "pipeline_overhead",
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "config": str(args.config),
        "overrides": (QUICK if args.quick else []) + args.overrides,
        "quick": args.quick,
        "model": config.model.name,
        "strategy": config.strategy.name,
        "tasks": len(tasks),
        "pipeline_workers": config.scaling.num_workers,
        "pipeline_cpus_per_worker": config.scaling.cpus_per_worker,
        "bare_threads": threads,
        "pipeline_s": round(pipeline_s, 2),
        "bare_s": round(bare_s, 2),
        "ratio": round(ratio, 3),
        "target_ratio": 1.3,
        "fixed_costs_s": fixed,
        "fixed_total_s": round(fixed_total, 1),
        "ratio_fixed_only": round(ratio_fixed_only, 3),
        "load_average": {k: round(v, 2) for k, v in load.items()},
        "chain_level_s": chain_level,
        "bare_chain_level_s": {k: round(bare[k], 2) for k in ("model_load_s", "zero_shot_s", "export_s")},
        "per_task": per_task,
        "bare_runs": [{"threads": n, "bare_s": round(b["total_s"], 2), "zero_shot_s": round(b["zero_shot_s"], 2),
                       "per_task": [{k: round(v, 2) for k, v in t.items() if k in ("train_s", "eval_s", "task_s")} for t in b["per_task"]],
                       "average_accuracy": b["summary"]["average_accuracy"]} for n, b in zip(bare_threads, bare_runs)],
        "average_accuracy": {"pipeline": pipeline_run["summary"]["average_accuracy"], "bare": bare["summary"]["average_accuracy"]},
    }))


if __name__ == "__main__":
    main()
