"""The chain driver: preprocess every task (Ray Data), train them in order (Ray Train + DeepSpeed) with each
task scored on every task seen so far, and record each task as it ends (manifest, MLflow).

One Ray cluster and one Ray Train worker group serve the whole chain: the workers score the base model
(the zero-shot row), train a task, score it (sharded over the ranks) and report its checkpoint with the
scores, go on to the next task, and end with the export, while the driver records the results as they
arrive. The driver holds no model: everything that needs one runs where the workers' resources are.
Progress is in the run folder's manifest, so a re-submitted chain (same run_name) skips finished
tasks and continues from the last checkpoint.
"""

from __future__ import annotations

import gc
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from pipeline.config import ConfigError, ChainConfig
from pipeline.manifest import MANIFEST, Manifest, TaskRecord
from pipeline.ray_workers import quiet_ray_data, start_ray
from pipeline.run_lock import RunFolderLock
from pipeline.storage import RunFolder
from pipeline.streams import Task, check_answers_tokenize, load_stream, stream_order
from pipeline.tokenizing import TokenizerLoader
from procl import make_strategy, metrics
from procl.checkpoint import META_FILE, recorded_sha256

console = Console()


@dataclass
class ChainResult:
    run_folder: RunFolder
    matrix: list[list[float]]
    summary: dict[str, float]
    adapter_dir: RunFolder | None
    tracking_uri: str
    mlflow_run_id: str | None


# -- the driver ------------------------------------------------------------------------------------


def select_tasks(config: ChainConfig) -> list[Task]:
    stream_order(config.stream.path, config.stream.order)  # a bad stream file fails before Ray starts
    init_ray(config)  # the tasks are sampled by Ray Data: on the chain's Ray, not on one started by default
    tasks = load_stream(config.stream.path, config.stream.order)
    return tasks[: config.stream.max_tasks] if config.stream.max_tasks else tasks


def init_ray(config: ChainConfig) -> None:
    """The chain's Ray: a fresh local one has the machine's CPUs, or as many logical ones as the chain holds
    (`ScalingSettings.chain_cpus`) where that is more, unless `ray.num_cpus` says."""
    local_cpus = config.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(config.scaling.chain_cpus()))
    start_ray(config.ray.address, local_cpus if config.ray.address is None else None)


def steps_per_task(config: ChainConfig, examples: int) -> int:
    """Optimizer steps a task of `examples` training rows takes: each worker's equal shard in micro-batches of
    batch_size (the last one may be short), accumulated over the epochs, within training.max_steps."""
    shard = examples // config.scaling.num_workers
    micro_batches = config.training.epochs * math.ceil(shard / config.training.batch_size)
    steps = micro_batches // config.training.gradient_accumulation
    return min(steps, config.training.max_steps or steps)


def _tokenizer_factory(config: ChainConfig) -> TokenizerLoader:
    return TokenizerLoader.of(config.model)


def _task_dataset(config: ChainConfig, examples: list):
    """A task's tokenized training rows (Ray Data, lazy): Ray Train splits it into one equal shard per worker."""
    from pipeline.preprocess import tokenized_dataset

    return tokenized_dataset([tuple(e) for e in examples], _tokenizer_factory(config), config.training.max_length, config.training.mask_prompt)


def check_cluster_cpus(config: ChainConfig, cluster_cpus: float | None = None) -> None:
    """A chain needs its training workers' CPUs and its ingest CPUs at once: fail now rather than hang.
    `cluster_cpus`: the joined Ray's when None."""
    if cluster_cpus is None:
        import ray

        cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    scaling = config.scaling
    if cluster_cpus < scaling.chain_cpus():
        raise ConfigError(f"scaling: the chain needs {scaling.chain_cpus():g} CPUs ({scaling.num_workers} workers x cpus_per_worker "
                          f"{scaling.cpus_per_worker:g} + ingest_cpus {scaling.ingest_cpus:g}), the Ray cluster has {cluster_cpus:g}; "
                          "lower them or give Ray more CPUs (ray.num_cpus for a local Ray)")


def _worker_group_results(config: ChainConfig, tasks: list[Task], plan: list[tuple[int, list]], previous_state: RunFolder | None,
                          zero_shot: bool, export: bool) -> Iterator[dict]:
    """Run the chain's worker group (one Ray Train fit): the zero-shot row if `zero_shot`, the planned (task
    index, training examples) in order, then the export if `export`. Yields each result
    (`pipeline.task_results.TaskResults`) as soon as the workers report it."""
    import uuid
    from queue import Empty

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.task_results import TaskResults
    from pipeline.preprocess import ingest_config
    from pipeline.train_worker import task_dataset, train_chain

    quiet_ray_data()  # in the driver too, where the datasets are tokenized (a Tune trial's chain may not call start_ray)
    entries = [{
        "index": index,
        "label": f"task {index + 1}/{len(tasks)} {tasks[index].name}",
        "examples": examples,
        "steps": steps_per_task(config, len(examples)),
        "seen": tasks[: index + 1],
    } for index, examples in plan]
    # on the driver's node, as Ray Train's controller is: a worker node may be lost mid-chain (and inside a Tune
    # trial the default would place it in the trial's placement group)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    run_folder = config.run_folder()
    # Ray Train persists the workers' checkpoints in the run folder, through its filesystem when that is object storage
    storage = run_folder / "ray"
    trainer = TorchTrainer(
        train_chain,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "zero_shot_tasks": tasks if zero_shot else None,
            "plan": entries,
            "previous_state": str(previous_state) if previous_state else None,
            "export": export,
            "fit_id": uuid.uuid4().hex,
        },
        datasets={task_dataset(index): _task_dataset(config, examples) for index, examples in plan},
        dataset_config=ingest_config(config.scaling.ingest_cpus),
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=config.scaling.worker_resources(),
        ),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name="chain",
            storage_path=storage.path,
            storage_filesystem=None if storage.is_local else storage.filesystem,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TaskResults(run_folder, queue)],
        ),
    )
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the driver's thread below
            outcome["error"] = error

    # fit() blocks until the last task; it runs beside the driver, which records each task as it ends.
    # A daemon thread: a driver that fails (or is interrupted) exits without waiting for the training.
    fitting = threading.Thread(target=fit, name="chain-fit", daemon=True)
    fitting.start()
    kinds: list[str] = []
    while fitting.is_alive() or not queue.empty():
        try:
            results = queue.get(timeout=0.5)
        except Empty:
            continue
        kinds.append(results["kind"])
        yield results
    tasks_done = kinds.count("task")
    if zero_shot and "zero_shot" not in kinds:
        stage = "zero-shot evaluation"
    elif tasks_done < len(plan):
        stage = f"task {tasks[plan[tasks_done][0]].name}: training"
    else:
        stage = "export"
    if isinstance(outcome.get("error"), TrainingFailedError):  # one line for the CLI; the workers' tracebacks are in Ray's log
        raise RuntimeError(f"{stage} failed (after {config.scaling.max_failures} restarts): {_root_cause(outcome['error'])}") from outcome["error"]
    if "error" in outcome:
        raise outcome["error"]
    if stage != "export" or (export and "export" not in kinds):
        raise RuntimeError(f"{stage} ended without reporting its results ({outcome['result'].error})")


def _training_plan(config: ChainConfig, tasks: list[Task], pending: list[int], previous: RunFolder | None) -> list[tuple[int, list]]:
    """(task index, training examples) of each pending task: replay and multitask mix in earlier tasks' examples,
    which depend on the data alone, so every task's examples are known before training starts."""
    data_strategy = make_strategy(config.strategy.name, seed=config.training.seed, **config.strategy.options())
    if previous is not None:
        data_strategy.load_data_state(json.loads((previous / META_FILE).read_text()))
    plan = []
    for index in pending:
        examples = data_strategy.training_examples(index, [list(pair) for pair in tasks[index].training_texts()])
        data_strategy.remember(index, examples)
        plan.append((index, examples))
    return plan


def _root_cause(error: Exception) -> str:
    """The last line of the first worker's (or the controller's) error: the exception that started it."""
    failures = getattr(error, "worker_failures", None)
    cause = next(iter(failures.values())) if failures else getattr(error, "controller_failure", error)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def run_chain(config: ChainConfig, config_file: Path | None = None, *, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, on_task_done: Callable[[TaskRecord, Manifest], None] | None = None) -> ChainResult:
    """Run (or resume) the whole chain described by `config`.

    `parent_run_id` nests the chain's MLflow run under another (a sweep's), `tags` go on the chain's run,
    and `on_task_done(record, manifest)` is called after each task, also for tasks a resumed chain skips
    (a Tune trial reports its objective there).
    """
    run_folder = config.run_folder()
    with ExitStack() as owned:  # one driver per chain, to its end
        # a run folder that exists may have a live owner: a second driver is refused at once, not after sampling;
        # a new one is created only once the data has been checked (bad data writes nothing)
        existed = run_folder.exists()
        if existed:
            owned.enter_context(_own_run_folder(run_folder))
        console.print(f"[bold]sampling[/] the tasks of {config.stream.path}")  # Ray starts here: sampling runs on Ray Data
        tasks = select_tasks(config)  # data problems fail here, before anything is written or trained
        check_cluster_cpus(config)  # the worker group's and its ingest's: only a chain that trains needs them
        check_answers_tokenize(tasks, _tokenizer_factory(config)())
        precision = config.precision_note()  # settles the precision: a setting this machine cannot run (flash attention) fails here
        if not existed:
            owned.enter_context(_own_run_folder(run_folder))
        return _drive_chain(config, tasks, precision, config_file, parent_run_id, tags, on_task_done)


def _own_run_folder(run_folder: RunFolder) -> RunFolderLock:
    _check_writable(run_folder)
    return RunFolderLock(run_folder)


def _drive_chain(config: ChainConfig, tasks: list[Task], precision: str, config_file: Path | None, parent_run_id: str | None,
                 tags: dict[str, str] | None, on_task_done: Callable[[TaskRecord, Manifest], None] | None) -> ChainResult:
    from pipeline.mlflow_store import default_tracking_uri
    from pipeline.tracking import ChainTracker

    run_folder = config.run_folder()
    manifest = Manifest.open(run_folder, config.fingerprint(), [task.name for task in tasks])
    # one default store for every chain under output_dir, so strategies compare side by side in one UI (an
    # output_dir in object storage has tracking.uri set: the config refuses it otherwise)
    store_dir = run_folder.parent.local_path
    tracking_uri = config.tracking.uri or default_tracking_uri(store_dir)
    tracker = ChainTracker(tracking_uri, config.tracking.experiment, store_dir)  # an unusable store fails now
    print(precision)
    init_ray(config)
    datasets = _task_inputs(tasks)

    with tracker:
        _start_chain_run(tracker, config, manifest, datasets, config_file, parent_run_id, tags)
        for index in range(len(tasks)):
            if manifest.is_done(index):
                record = manifest.task(index)
                if record.mlflow_run_id is None:  # the driver stopped between recording the task and logging it
                    record.mlflow_run_id = _log_task(tracker, manifest, record, config, datasets[record.name])
                    manifest.save(run_folder)
                console.print(f"[dim]task {index + 1}/{len(tasks)} {tasks[index].name}: finished earlier, skipped[/]")
                if on_task_done:
                    on_task_done(record, manifest)
        pending = [index for index in range(len(tasks)) if not manifest.is_done(index)]
        zero_shot = manifest.zero_shot is None
        export = manifest.adapter_dir is None and config.exports_plain_lora()
        if zero_shot:
            console.print(f"[bold]zero-shot[/] evaluation on {len(tasks)} tasks")
        if pending:
            console.print(f"[bold]training[/] tasks {pending[0] + 1}..{len(tasks)} in one worker group of {config.scaling.num_workers}")
        if zero_shot or pending or export:
            previous = manifest.last_state()
            plan = _training_plan(config, tasks, pending, previous)
            train_examples = {index: len(examples) for index, examples in plan}
            last_end = time.monotonic()
            for results in _worker_group_results(config, tasks, plan, previous, zero_shot, export):
                if results["kind"] == "zero_shot":
                    if manifest.zero_shot is None:  # a restart before the first checkpoint reports it again
                        manifest.zero_shot, manifest.zero_shot_seconds = results["scores"], results["seconds"]
                        manifest.save(run_folder)
                        console.print(f"zero-shot: test {_format(results['scores']['test'])}")
                    last_end = time.monotonic()
                elif results["kind"] == "export":
                    manifest.adapter_dir = results["adapter_dir"]
                    _log_chain_artifacts(tracker, manifest, run_folder)
                else:
                    seconds = results["seconds"] | {"task": time.monotonic() - last_end}  # "task": since the previous task's end
                    last_end = time.monotonic()
                    seconds["train"] = seconds["task"] - seconds["evaluate"]  # with start-up and data: all but scoring
                    record = _record_task(manifest, tasks, results, seconds, train_examples[results["index"]])
                    manifest.save(run_folder)
                    record.mlflow_run_id = _log_task(tracker, manifest, record, config, datasets[record.name])
                    manifest.save(run_folder)
                    console.print(f"task {record.index + 1}/{len(tasks)} {record.name}: test {_format(record.test)}  "
                                  f"(train {seconds['train']:.0f} s, evaluate {seconds['evaluate']:.0f} s)")
                    if on_task_done:
                        on_task_done(record, manifest)
        if manifest.adapter_dir is None and not config.exports_plain_lora():
            console.print("no adapter export: procl.reference_mlp keeps an MLP in the model at inference; "
                          f"the model is the last checkpoint, {manifest.last_state()}")
            _log_chain_artifacts(tracker, manifest, run_folder)
        share = _log_evaluation_share(tracker, manifest)
        if not math.isnan(share):
            console.print(f"evaluation took {share:.0%} of the chain's task time")
    matrix = manifest.matrix("test")
    adapter_dir = RunFolder.at(manifest.adapter_dir) if manifest.adapter_dir else None
    return ChainResult(run_folder, matrix, metrics.summary(matrix), adapter_dir, tracking_uri, manifest.mlflow_run_id)


def log_recorded_chain(config: ChainConfig, manifest: Manifest, tracking_uri: str) -> str:
    """Log a chain recorded by a loop outside the Ray driver (`manifest`: every task's scores, losses and
    checkpoint; benchmarks/cl_quality.py's bare loop records one) into `tracking_uri` as the driver logs its
    chains: the chain run (params, tags, datasets), a nested run per task, the figures, tables and adapter.
    A manifest that names its MLflow run already is logged into that run again (idempotent), not a new one.
    Saves the manifest with the run ids; returns the chain run's id."""
    from pipeline.tracking import ChainTracker

    run_folder = config.run_folder()
    tasks = select_tasks(config)
    datasets = _task_inputs(tasks)
    with ChainTracker(tracking_uri, config.tracking.experiment, run_folder.parent.local_path) as tracker:
        _start_chain_run(tracker, config, manifest, datasets, start_time=manifest.started_at())
        for record in manifest.tasks:
            record.mlflow_run_id = _log_task(tracker, manifest, record, config, datasets[record.name])
        _log_chain_artifacts(tracker, manifest, run_folder)
        _log_evaluation_share(tracker, manifest)
    return manifest.mlflow_run_id


def _task_inputs(tasks: list[Task]) -> dict[str, list]:
    """Each task's splits as MLflow dataset inputs, by task name."""
    from pipeline.tracking import split_datasets

    return {task.name: split_datasets(task.name, task.splits, task.source) for task in tasks}


def _start_chain_run(tracker, config: ChainConfig, manifest: Manifest, datasets: dict[str, list], config_file: Path | None = None,
                     parent_run_id: str | None = None, tags: dict[str, str] | None = None, start_time: float | None = None) -> None:
    """Start the chain's MLflow run (or resume the manifest's) and save its id in the manifest."""
    manifest.mlflow_run_id = tracker.start(
        config.run_name, params=config.model_dump(mode="json"), tags=provenance_tags() | _chain_tags(config) | (tags or {}),
        config_file=config_file, resume_run_id=manifest.mlflow_run_id, parent_run_id=parent_run_id,
        resolved_config=config.model_dump(mode="json"), datasets=[entry for entries in datasets.values() for entry in entries],
        start_time=start_time,
    )
    manifest.save(config.run_folder())


def _log_chain_artifacts(tracker, manifest: Manifest, run_folder: RunFolder) -> None:
    """The chain's end products on its run: the exported adapter (when there is one) and the manifest."""
    with ExitStack() as local:  # MLflow logs local files: a run folder in object storage is downloaded first
        adapter = {"adapter": local.enter_context(RunFolder.at(manifest.adapter_dir).local_copy())} if manifest.adapter_dir else {}
        tracker.log_artifacts(adapter | {"manifest": local.enter_context(manifest.save(run_folder).local_copy())})


def _log_evaluation_share(tracker, manifest: Manifest) -> float:
    """Log (when timings exist) and return evaluation's share of the chain's task time."""
    share = manifest.evaluation_share()
    if not math.isnan(share):
        tracker.log_summary({"seconds/evaluation_share": share})
    return share


def _record_task(manifest: Manifest, tasks: list[Task], results: dict, seconds: dict[str, float], train_examples: int) -> TaskRecord:
    state_dir = RunFolder.at(results["state_dir"])
    with state_dir.local_copy() as folder:
        tensors_sha256 = recorded_sha256(folder)
    scores = results["scores"]
    record = TaskRecord(results["index"], tasks[results["index"]].name, str(state_dir), tensors_sha256,
                        scores["test"], scores["validation"], results["losses"], seconds=seconds, resumed_at=results["resumed_at"],
                        memory=results["memory"], ended_at=time.time(), train_examples=train_examples)
    manifest.record(record)
    return record


def _check_writable(run_folder: RunFolder) -> None:
    """Create the run folder and prove it writable now, not when the first task's checkpoint is due."""
    try:
        run_folder.make()
        run_folder.probe_writable()
    except OSError as error:
        raise ConfigError(f"output_dir: cannot write the run folder {run_folder} ({getattr(error, 'strerror', None) or error})") from error


def _log_task(tracker, manifest: Manifest, record: TaskRecord, config: ChainConfig, datasets: list) -> str:
    from pipeline.tracking import MATRIX_TABLE, VALIDATION_MATRIX_TABLE

    state = RunFolder.at(record.state_dir)
    rows = record.index + 2  # zero-shot row + tasks up to this one, also when re-logging an earlier task
    test_matrix = manifest.matrix("test")[:rows]
    validation_matrix = manifest.matrix("validation")[:rows]
    summary = metrics.summary(test_matrix)
    task_metrics = {f"test/{name}": score for name, score in record.test.items()}
    task_metrics |= {f"validation/{name}": score for name, score in record.validation.items()}
    # prefixed: the MLflow UI groups charts by the part before the first "/" (docs/METRICS.md lists the names)
    task_metrics |= {f"cl/{k}": v for k, v in summary.items() if not math.isnan(v)}
    task_metrics["cl/validation_average_accuracy"] = metrics.average_accuracy(validation_matrix)
    task_metrics |= {f"seconds/{phase}": value for phase, value in record.seconds.items()}
    task_metrics |= {f"memory/{name}": value for name, value in record.memory.items()}
    usage = json.loads((state / META_FILE).read_text()).get("task_slot_usage")
    span = None
    if record.ended_at is not None and "task" in record.seconds:
        span = (record.ended_at - record.seconds["task"], record.ended_at)
    figures = _task_figures(manifest, record, test_matrix, usage)
    with ExitStack() as local:  # MLflow logs local files: a run folder in object storage is downloaded first
        artifacts = {f"checkpoints/task_{record.index}": local.enter_context(state.local_copy()),
                     "manifest": local.enter_context((config.run_folder() / MANIFEST).local_copy())}
        nested = tracker.log_task(
            record.index,
            record.name,
            span=span,
            datasets=datasets,
            params={"task_name": record.name, "optimizer_steps": len(record.losses)}
            | ({} if record.train_examples is None else {"train_examples": record.train_examples}),
            train_losses=record.losses,
            metrics=task_metrics,
            figures=figures,
            records={"accuracy_matrix.json": _matrix_record(test_matrix, manifest.task_names, record.index)}
            | ({"slot_usage.json": usage} if usage else {}),
            tables={MATRIX_TABLE: _matrix_columns(test_matrix, manifest.task_names),
                    VALIDATION_MATRIX_TABLE: _matrix_columns(validation_matrix, manifest.task_names)},
            artifacts=artifacts,
        )
    # A matplotlib Figure is a web of reference cycles that holds its rendered pixels in native memory, so only
    # the cyclic collector frees it; with torch and Ray loaded, full collections are rare and every task's
    # figures stayed: the driver grew 5-8 MiB per task (benchmarks/chain_memory.py). One full collection per
    # task (~0.3 s) frees them.
    figures.clear()
    gc.collect()
    return nested


def _task_figures(manifest: Manifest, record: TaskRecord, matrix: list[list[float]], usage: list | None) -> dict:
    """The chain's figures after `record`'s task, by MLflow image key: the accuracy matrix, forgetting, the train
    loss of every task so far (from the manifest, so also complete after a resume) and ProCL's slot usage."""
    from pipeline import plots

    losses = {task.name: task.losses for task in manifest.tasks if task.index <= record.index}
    figures = {"accuracy_matrix": plots.accuracy_matrix_heatmap(matrix, manifest.task_names),
               "forgetting": plots.forgetting_plot(matrix, manifest.task_names), "loss_curve": plots.loss_curve_plot(losses)}
    if usage:
        figures["slot_usage"] = plots.slot_usage_plot(usage, manifest.task_names)
    return figures


def _row_names(matrix: list[list[float]], task_names: list[str]) -> list[str]:
    return ["zero-shot"] + [f"after {name}" for name in task_names[: len(matrix) - 1]]


def _json_rows(matrix: list[list[float]]) -> list[list[float | None]]:
    """The matrix's rows with NaN (a task not scored yet) as null: JSON has no NaN."""
    return [[None if math.isnan(v) else v for v in row] for row in matrix]


def _matrix_record(matrix: list[list[float]], task_names: list[str], task_index: int) -> dict:
    """The accuracy matrix after task `task_index` as its JSON record."""
    return {"task_index": task_index, "task_names": task_names, "row_names": _row_names(matrix, task_names),
            "rows": _json_rows(matrix)}


def _matrix_columns(matrix: list[list[float]], task_names: list[str]) -> dict[str, list]:
    """The accuracy matrix as table columns: "after" (the row's name), then a column per task."""
    rows = _json_rows(matrix)
    return {"after": _row_names(matrix, task_names)} | {name: [row[j] for row in rows] for j, name in enumerate(task_names)}


def _chain_tags(config: ChainConfig) -> dict[str, str]:
    """What `procl report` groups chains by: the stream's name and the order's (resolved: None is the first)."""
    from pipeline.tracking import KIND_TAG, ORDER_TAG, STREAM_TAG

    spec, order = stream_order(config.stream.path, config.stream.order)
    return {KIND_TAG: "chain", STREAM_TAG: spec.name, ORDER_TAG: order}


def _format(scores: dict[str, float]) -> str:
    return "  ".join(f"{name} {score:.3f}" for name, score in scores.items())


def provenance_tags() -> dict[str, str]:
    """MLflow's standard run tags (user, source, and the commit, branch and remote of this project's git
    checkout: the runs list's Source column) and the versions of the stack, so that runs are comparable and
    reproducible. The git tags are read from the project's folder, not from the entry point's as MLflow's
    own context does: a Tune trial's chain runs in a Ray worker process."""
    from importlib.metadata import PackageNotFoundError, version

    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL, MLFLOW_SOURCE_NAME

    project = str(Path(__file__).parent)
    git = {MLFLOW_GIT_COMMIT: git_utils.get_git_commit(project), MLFLOW_GIT_BRANCH: git_utils.get_git_branch(project),
           MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(project)}
    tags = resolve_tags({MLFLOW_SOURCE_NAME: "python -m pipeline"} | {key: value for key, value in git.items() if value})
    for package in ("torch", "transformers", "peft", "deepspeed", "ray", "mlflow"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"version.{package}"] = "missing"
    return tags
