"""The chain driver: for each task, preprocess (Ray Data), train (Ray Train + DeepSpeed), evaluate, record.

One Ray cluster serves the whole chain. The driver holds no model: training runs in Ray Train
workers, evaluation and export in Ray tasks that load the model where the resources are (a GPU
node on a cluster). Progress is in the run folder's manifest, so a re-submitted chain (same
run_name) skips finished tasks and continues from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

from rich.console import Console

from pipeline.config import RunConfig
from pipeline.manifest import Manifest, TaskRecord
from pipeline.streams import Task, check_answers_tokenize, load_stream
from procl import make_strategy, metrics
from procl.atomic import atomic_directory
from procl.checkpoint import META_FILE, TENSORS_FILE, load_strategy_state, sha256_file

console = Console()
MAX_WORKER_FAILURES = 2  # Ray Train restarts of a task's worker group (from its last in-task checkpoint)
# worker processes a local CPU chain's Ray keeps beyond one per CPU before ending idle ones: a task's
# Ray Train and Ray Data actors count too (8 on 2 CPUs is what benchmarks/pipeline_overhead.py measured)
EXTRA_WORKERS_KEPT = 6


@dataclass
class ChainResult:
    run_dir: Path
    matrix: list[list[float]]
    summary: dict[str, float]
    adapter_dir: Path | None
    tracking_uri: str
    mlflow_run_id: str | None


# -- work that runs in Ray tasks (it needs the model) ----------------------------------------------


def _load_trained(config: RunConfig, state_dir: str | None):
    """(model, tokenizer, strategy) at a checkpoint, or the base model for the zero-shot row."""
    from pipeline.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(config.model)
    strategy = make_strategy(config.strategy.name, seed=config.training.seed, **config.strategy.options())
    if state_dir is not None:
        model = strategy.build(model)
        load_strategy_state(strategy, model, state_dir)
    return model, tokenizer, strategy


def evaluate_state(config_data: dict, state_dir: str | None, tasks: list[Task], threads: int) -> dict[str, dict[str, float]]:
    """{split: {task: score}} on the validation and test splits of `tasks`."""
    import torch

    torch.set_num_threads(threads)
    config = RunConfig.model_validate(config_data)
    model, tokenizer, strategy = _load_trained(config, state_dir)
    if state_dir is not None and config.exports_plain_lora():
        model = model.merge_and_unload()  # a plain LoRA: evaluate exactly what inference will run
    return score_tasks(model, tokenizer, tasks, config)


def score_tasks(model, tokenizer, tasks: list[Task], config: RunConfig) -> dict[str, dict[str, float]]:
    """{split: {task: score}} on the validation and test splits of `tasks`."""
    import torch

    from pipeline.evaluation import answered_correctly

    scores: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.scores_in_bf16()):
        for task in tasks:
            # both splits in one call: their prompts are batched by length together (less padding)
            correct = answered_correctly(
                model, tokenizer, [p for split in scores for p in task.prompts(split)],
                [t for split in scores for t in task.targets(split)], task.metric,
                task.answers or None, config.evaluation.batch_size, config.evaluation.max_new_tokens,
            )
            for split in scores:
                split_correct, correct = correct[: len(task.splits[split])], correct[len(task.splits[split]) :]
                scores[split][task.name] = sum(split_correct) / len(split_correct)
    return scores


def export_state(config_data: dict, state_dir: str, out_dir: str) -> str:
    config = RunConfig.model_validate(config_data)
    model, _, strategy = _load_trained(config, state_dir)
    return str(strategy.export(model, out_dir))


# -- the driver ------------------------------------------------------------------------------------


def select_tasks(config: RunConfig) -> list[Task]:
    tasks = load_stream(config.stream.path, config.stream.order)
    return tasks[: config.stream.max_tasks] if config.stream.max_tasks else tasks


def init_ray(config: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # no address: a fresh local Ray for this chain (never an unrelated cluster that happens to run on
    # the machine), without a dashboard; inside `ray job submit`, ray.address=auto joins the cluster
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if config.ray.address is None:
        # no metrics either: nothing scrapes them without a dashboard, and the metrics agent's series (a new
        # set per task's Ray Data and Ray Train run) grew its memory every task (benchmarks/chain_memory.py)
        system_config: dict = {"enable_metrics_collection": False}
        if not config.scaling.use_gpu:
            # keep the evaluation task's worker process warm while training holds every CPU: past the
            # default limit (one worker per CPU) Ray ends it, and each task's evaluation then started a
            # new process and re-imported torch (4.6 s of every task, benchmarks/pipeline_overhead.py).
            # Not on GPU, where an idle worker would keep its CUDA context and cached memory.
            system_config["num_workers_soft_limit"] = (config.ray.num_cpus or os.cpu_count() or 1) + EXTRA_WORKERS_KEPT
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "pipeline.ray_workers.quiet_placement_group_cleaner"},
                 _system_config=system_config)
    else:
        ray.init(address=config.ray.address)


def steps_per_task(config: RunConfig, task: Task) -> int:
    per_step = config.training.batch_size * config.scaling.num_workers * config.training.gradient_accumulation
    return config.training.epochs * (len(task.splits["train"]) // per_step)


def _tokenizer_factory(config: RunConfig):
    from pipeline.models import load_tokenizer

    return partial(load_tokenizer, config.model)


def _train(config: RunConfig, task_index: int, task: Task, examples: list, previous_state: Path | None):
    """One Ray Train fit() for one task; returns the final checkpoint's folder."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.preprocess import tokenized_dataset
    from pipeline.train_worker import train_task

    # per-task datasets are small: Ray Data's progress bars would drown the chain's own progress lines
    # (set here, not in init_ray, which a Tune trial's chain skips: Ray is already up there)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = tokenized_dataset([tuple(e) for e in examples], _tokenizer_factory(config), config.training.max_length, config.training.mask_prompt)
    trainer = TorchTrainer(
        train_task,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "task_index": task_index,
            "previous_state": str(previous_state) if previous_state else None,
            "examples": examples,
            "total_steps": steps_per_task(config, task),
            "task_label": f"task {task_index + 1} ({task.name})",
        },
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=config.scaling.worker_resources(),
        ),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        datasets={"train": dataset},
        run_config=TrainRunConfig(
            name=f"task_{task_index}",
            storage_path=str(config.run_dir() / "ray"),
            failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as error:  # one line for the CLI; the workers' tracebacks are in Ray's log
        raise RuntimeError(f"task {task.name}: training failed (after {MAX_WORKER_FAILURES} restarts): {_root_cause(error)}") from error
    if result.checkpoint is None:
        raise RuntimeError(f"task {task.name}: training ended without a checkpoint ({result.error})")
    return result.checkpoint


def _root_cause(error: Exception) -> str:
    """The last line of the first worker's (or the controller's) error: the exception that started it."""
    failures = getattr(error, "worker_failures", None)
    cause = next(iter(failures.values())) if failures else getattr(error, "controller_failure", error)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def _task_cpus(config: RunConfig) -> float:
    """CPUs of an evaluation/export task: the training footprint, capped at what one node offers.

    A Ray task runs on one node, while training workers may be spread over nodes of a few CPUs each
    (asking for their sum would never schedule there). Never less than one worker's CPUs.
    """
    import ray

    total = config.scaling.num_workers * config.scaling.cpus_per_worker
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    largest = max((r.get("CPU", 0.0) for r in nodes if not config.scaling.use_gpu or r.get("GPU", 0) > 0), default=0.0)
    return max(config.scaling.cpus_per_worker, min(total, largest))


@cache
def _remote_function(fn):
    """One Ray remote function per `fn`, exported to the cluster once rather than at every task."""
    import ray

    return ray.remote(fn)


def _remote(fn, config: RunConfig, cpus: float):
    """`fn` as a Ray task with `cpus` CPUs (see `_task_cpus`) and a GPU when training uses one."""
    # an explicit strategy: inside a Tune trial the default would place the task in the trial's
    # placement group, which holds no CPUs (its Ray Train workers get their own)
    return _remote_function(fn).options(num_cpus=cpus, num_gpus=1 if config.scaling.use_gpu else 0, scheduling_strategy="DEFAULT")


def run_chain(config: RunConfig, config_file: Path | None = None, *, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, on_task_done: Callable[[TaskRecord, Manifest], None] | None = None) -> ChainResult:
    """Run (or resume) the whole chain described by `config`.

    `parent_run_id` nests the chain's MLflow run under another (a sweep's), `tags` go on the chain's run,
    and `on_task_done(record, manifest)` is called after each task, also for tasks a resumed chain skips
    (a Tune trial reports its objective there).
    """
    import ray

    from pipeline.tracking import ChainTracker, default_tracking_uri

    run_dir = config.run_dir()
    tasks = select_tasks(config)  # data problems fail here, before anything is written or started
    check_answers_tokenize(tasks, _tokenizer_factory(config)())
    names = [task.name for task in tasks]
    _check_writable(run_dir)
    manifest = Manifest.open(run_dir, config.fingerprint(), names)
    # one default store for every chain under output_dir, so strategies compare side by side in one UI
    store_dir = run_dir.parent
    tracking_uri = config.tracking.uri or default_tracking_uri(store_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = ChainTracker(tracking_uri, config.tracking.experiment, store_dir)  # an unusable store fails now
    init_ray(config)
    config_data = config.model_dump(mode="json")
    task_cpus = _task_cpus(config)
    threads = max(1, int(task_cpus))  # torch threads of evaluation: the CPUs its Ray task holds

    with tracker:
        manifest.mlflow_run_id = tracker.start(
            config.run_name, params=config_data, tags=provenance_tags() | (tags or {}), config_file=config_file,
            resume_run_id=manifest.mlflow_run_id, parent_run_id=parent_run_id,
        )
        manifest.save(run_dir)
        if manifest.zero_shot is None:
            console.print(f"[bold]zero-shot[/] evaluation on {len(tasks)} tasks")
            started = time.monotonic()
            manifest.zero_shot = ray.get(_remote(evaluate_state, config, task_cpus).remote(config_data, None, tasks, threads))
            manifest.zero_shot_seconds = time.monotonic() - started
            manifest.save(run_dir)
        data_strategy = make_strategy(config.strategy.name, seed=config.training.seed, **config.strategy.options())
        for index, task in enumerate(tasks):
            if manifest.is_done(index):
                record = manifest.task(index)
                if record.mlflow_run_id is None:  # the driver stopped between recording the task and logging it
                    record.mlflow_run_id = _log_task(tracker, manifest, record, config)
                    manifest.save(run_dir)
                console.print(f"[dim]task {index + 1}/{len(tasks)} {task.name}: finished earlier, skipped[/]")
                if on_task_done:
                    on_task_done(record, manifest)
                continue
            started = time.monotonic()
            previous = manifest.last_state()
            if previous is not None:
                data_strategy.load_data_state(json.loads((previous / META_FILE).read_text()))
            examples = data_strategy.training_examples(index, [list(pair) for pair in task.training_texts()])
            console.print(f"[bold]task {index + 1}/{len(tasks)} {task.name}[/]: {len(examples)} training examples, "
                          f"{steps_per_task(config, task)} steps on {config.scaling.num_workers} workers")
            checkpoint = _train(config, index, task, examples, previous)
            state_dir = run_dir / "checkpoints" / f"task_{index}"
            with checkpoint.as_directory() as folder, atomic_directory(state_dir) as staging:
                shutil.copytree(Path(folder) / "state", staging, dirs_exist_ok=True)
                losses = json.loads((Path(folder) / "progress.json").read_text())["losses"]
            trained = time.monotonic()
            scores = ray.get(_remote(evaluate_state, config, task_cpus).remote(config_data, str(state_dir), tasks[: index + 1], threads))
            evaluated = time.monotonic()
            seconds = {"train": trained - started, "evaluate": evaluated - trained, "task": evaluated - started}
            record = TaskRecord(index, task.name, str(state_dir), sha256_file(state_dir / TENSORS_FILE), scores["test"], scores["validation"],
                                losses, seconds=seconds)
            manifest.record(record)
            manifest.save(run_dir)
            record.mlflow_run_id = _log_task(tracker, manifest, record, config)
            manifest.save(run_dir)
            console.print(f"  test {_format(scores['test'])}  (train {seconds['train']:.0f} s, evaluate {seconds['evaluate']:.0f} s)")
            if on_task_done:
                on_task_done(record, manifest)

        if manifest.adapter_dir is None and not config.exports_plain_lora():
            console.print("no adapter export: procl.reference_mlp keeps an MLP in the model at inference; "
                          f"the model is the last checkpoint, {manifest.last_state()}")
            tracker.log_artifacts({"manifest": manifest.save(run_dir)})
        elif manifest.adapter_dir is None:
            # the consolidated adapter as a plain peft LoRA, and the finished manifest, on the chain's run
            adapter = run_dir / "adapter"
            manifest.adapter_dir = ray.get(_remote(export_state, config, task_cpus).remote(config_data, str(manifest.last_state()), str(adapter)))
            tracker.log_artifacts({"adapter": adapter, "manifest": manifest.save(run_dir)})
        share = manifest.evaluation_share()
        if not math.isnan(share):
            tracker.log_summary({"evaluation_share": share})
            console.print(f"evaluation took {share:.0%} of the chain's task time")
    matrix = manifest.matrix("test")
    adapter_dir = Path(manifest.adapter_dir) if manifest.adapter_dir else None
    return ChainResult(run_dir, matrix, metrics.summary(matrix), adapter_dir, tracking_uri, manifest.mlflow_run_id)


def _check_writable(run_dir: Path) -> None:
    """Create the run folder and prove it writable now, not when the first task's checkpoint is due."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise RuntimeError(f"output_dir: cannot write the run folder {run_dir} ({error.strerror or error})") from error


def _log_task(tracker, manifest: Manifest, record: TaskRecord, config: RunConfig) -> str:
    state_dir = Path(record.state_dir)
    rows = record.index + 2  # zero-shot row + tasks up to this one, also when re-logging an earlier task
    test_matrix = manifest.matrix("test")[:rows]
    validation_matrix = manifest.matrix("validation")[:rows]
    summary = metrics.summary(test_matrix)
    task_metrics = {f"test/{name}": score for name, score in record.test.items()}
    task_metrics |= {f"validation/{name}": score for name, score in record.validation.items()}
    task_metrics |= {k: v for k, v in summary.items() if not math.isnan(v)}
    task_metrics["validation_average_accuracy"] = metrics.average_accuracy(validation_matrix)
    task_metrics |= {f"seconds/{phase}": value for phase, value in record.seconds.items()}
    meta = json.loads((state_dir / META_FILE).read_text())
    return tracker.log_task(
        record.index,
        record.name,
        params={"task_name": record.name, "train_examples": len(record.losses)},
        train_losses=record.losses,
        metrics=task_metrics,
        matrix=test_matrix,
        task_names=manifest.task_names,
        task_slot_usage=meta.get("task_slot_usage"),
        artifacts={f"checkpoints/task_{record.index}": state_dir, "manifest": config.run_dir() / "manifest.json"},
    )


def _format(scores: dict[str, float]) -> str:
    return "  ".join(f"{name} {score:.3f}" for name, score in scores.items())


def provenance_tags() -> dict[str, str]:
    """Git commit and package versions, so runs are comparable and reproducible."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    tags: dict[str, str] = {}
    try:
        tags["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        tags["git_commit"] = "unknown"
    for package in ("torch", "transformers", "peft", "deepspeed", "ray", "mlflow"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"version.{package}"] = "missing"
    return tags
