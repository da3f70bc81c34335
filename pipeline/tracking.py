"""MLflow tracking of a continual-learning chain: one parent run per chain, one nested run per task.

The logger takes what it logs ready-made (figures drawn by `pipeline.plots`, JSON records, table columns,
dataset inputs from `split_datasets`); the store's checks are `pipeline.mlflow_store`'s and the redaction of
secrets `pipeline.redaction`'s. What a chain records (task indices 0-based, as the chain counts them):

- parent run: the chain's params and tags, the config file under ``config/`` and the resolved config as
  ``config/resolved.yaml``, every task's datasets; after each task, with step = task index, the caller's
  metrics and figures (MLflow images: the UI shows each key's history with a step slider), its records under
  ``tasks/task_<i>/``, the rows its tables gained, and each caller artifact ``artifact path -> local path``
  under a task-specific path (``checkpoints/task_<i>`` as given, or ``checkpoints`` -> ``checkpoints/task_<i>``).
  ``log_artifacts`` adds chain-level artifacts (final adapter, manifest).
- nested run per task (tags ``task_index``, ``task_name``, ``mlflow.parentRunId``), starting and ending
  when the task did: the task's params and datasets, and its train loss as the metric ``train/loss`` with
  step = optimizer step within the task.

Everything goes through ``MlflowClient`` with explicit run ids rather than the fluent
``mlflow.start_run`` stack: the active-run stack is process-global, and the chain's driver shares its
process with Ray and possibly other MLflow users (Ray Tune callbacks), so explicit ids keep the
parent/child pairing exact. The nested-run convention (the ``mlflow.parentRunId`` tag) is MLflow's own.

``log_task`` is idempotent: it reuses the task's nested run if one exists, logs only metric points
and params not already recorded, images and table rows it does not hold yet, and writes records and
artifacts to task-specific paths (overwriting). A chain that lost MLflow mid-run can therefore re-log
every task from its local records with a new tracker started with ``resume_run_id``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag, ViewType
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from pipeline.mlflow_store import StoreUnusable, TrackingError, check_store, open_experiment, store_errors
from pipeline.redaction import error_line, flatten_public, redact_uri, redacted_mapping, redacted_text

log = logging.getLogger(__name__)

TASK_INDEX_TAG = "task_index"
TASK_NAME_TAG = "task_name"
LAST_TASK_TAG = "last_task_index"  # highest task index logged on the parent: a resumed chain can read it
LOSS_METRIC = "train/loss"
KIND_TAG = "procl.kind"  # "chain" or "sweep"
STREAM_TAG, ORDER_TAG = "procl.stream", "procl.order"  # a chain's stream and order, by name
RESOLVED_CONFIG = "config/resolved.yaml"
MATRIX_TABLE = "tables/accuracy_matrix.json"  # the accuracy matrix as an MLflow table, a row per task trained
VALIDATION_MATRIX_TABLE = "tables/validation_accuracy_matrix.json"  # the same on the validation splits
# MLflow's convention for a dataset input's context is the data's role ("training", "testing")
SPLIT_CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}
_TRUNCATED = "...[truncated]"
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    # str() as mlflow.log_param does, so values logged by other MLflow code compare equal on resume;
    # truncation is deterministic, so a resumed chain's truncated value matches the stored one.
    return {key: _truncate(str(value), MAX_PARAM_VAL_LENGTH) for key, value in flatten_public(params).items()}


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {key: _truncate(str(value), MAX_TAG_VAL_LENGTH) for key, value in flatten_public(tags).items()}


def _metric_value(value: float) -> float:
    """The value as MLflow stores it (it clamps infinities), for comparing against recorded points."""
    value = float(value)
    if math.isinf(value):
        return math.copysign(sys.float_info.max, value)
    return value


def _point(step: int, value: float) -> tuple[int, float | str]:
    value = _metric_value(value)
    return step, "nan" if math.isnan(value) else value


def _pixels(figure: Figure) -> np.ndarray:
    """The figure drawn by its Agg canvas, as RGB pixels (MLflow's log_image takes them; no file in between)."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _check_artifacts(artifacts: Mapping[str, Path]) -> None:
    for name, local in artifacts.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or not Path(name).parts:
            raise ValueError(f"artifact path {name!r} must be a relative path inside the run's artifacts")
        if not Path(local).exists():
            raise ValueError(f"artifact {name!r}: {local} does not exist")


def split_datasets(task_name: str, splits: Mapping[str, Sequence[Mapping[str, str]]],
                   source: Mapping[str, Any]) -> list[DatasetInput]:
    """Each non-empty split of a task as an MLflow dataset input: named after the task, with the split's role as
    its context, a digest, schema and row count of the records, and `source` (the stream's description of
    where they were read from) as the tags of a code source: the records are sampled from it by the chain."""
    import pandas as pd
    from mlflow.data import from_pandas
    from mlflow.data.code_dataset_source import CodeDatasetSource

    code_source = CodeDatasetSource({f"procl.source.{key}": str(value) for key, value in flatten_public(dict(source)).items()})
    inputs = []
    for split, records in splits.items():
        if records:
            dataset = from_pandas(pd.DataFrame(list(records)), source=code_source, name=task_name, targets="target")
            inputs.append(DatasetInput(Dataset(**dataset.to_dict()), [InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXTS.get(split, split))]))
    return inputs


# ----------------------------------------------------------------------------- the tracker


class ChainTracker:
    """One MLflow parent run per continual-learning chain and one nested run per task.

    The store is checked at construction (reachable, schema usable, writable), so a bad tracking URI
    fails before any training starts. Use as a context manager to end the run FAILED on an exception
    (KILLED on KeyboardInterrupt) and FINISHED otherwise.

    Secrets: no param, tag or metric whose key looks like a secret (``looks_secret``: token, key,
    password, secret, credential) is ever logged, and such values in the logged config file are
    replaced by ``"<redacted>"``.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_dir: Path | None) -> None:
        """`run_dir`: the local folder where a local store keeps a new experiment's artifacts (`mlartifacts/`);
        None (an output_dir in object storage): beside the sqlite database."""
        self.tracking_uri = tracking_uri
        self.run_dir = None if run_dir is None else Path(run_dir).expanduser().resolve()
        self._safe_uri = redact_uri(tracking_uri)
        self.parent_run_id: str | None = None
        self._open_nested: str | None = None
        self._finished = False
        try:
            if self.run_dir is not None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnusable(f"cannot create the run folder {self.run_dir} for MLflow at {self._safe_uri}: {error_line(exc)}") from exc
        check_store(tracking_uri)
        with store_errors(self._safe_uri, "opening the store and its experiment"):
            self._client = MlflowClient(tracking_uri)
            self.experiment_id = open_experiment(self._client, experiment, self.run_dir)

    def _require_parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("ChainTracker.start() must be called before logging tasks")
        if self._finished:
            raise RuntimeError(f"the chain run {self.parent_run_id} is already finished")
        return self.parent_run_id

    # --------------------------------------------------------------- low-level logging

    def _log_batch(self, run_id: str, *, metrics: Sequence[Metric] = (), params: Mapping[str, str] | None = None,
                   tags: Mapping[str, str] | None = None) -> None:
        """MLflow's log_batch (it splits the batch within the store's per-request limits), synchronously even
        when async logging is enabled: a failure must raise here, inside log_task, for re-logging to know what
        is missing."""
        self._client.log_batch(run_id, metrics=list(metrics), params=[Param(k, v) for k, v in (params or {}).items()],
                               tags=[RunTag(k, v) for k, v in (tags or {}).items()], synchronous=True)

    def _new_params(self, run_id: str, params: Mapping[str, str]) -> dict[str, str]:
        """The params not yet on the run; raises if one was logged with another value (MLflow forbids changes)."""
        logged = self._client.get_run(run_id).data.params
        changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            details = "; ".join(f"{k}: logged {old!r}, now {new!r}" for k, (old, new) in sorted(changed.items()))
            raise TrackingError(f"run {run_id} already has different values for param(s) {', '.join(sorted(changed))} ({details})")
        return {k: v for k, v in params.items() if k not in logged}

    def _log_missing_points(self, run_id: str, series: Mapping[str, Sequence[tuple[int, float]]], fresh: bool) -> None:
        """Log (step, value) points of each metric that the run does not already hold (idempotent re-logging)."""
        now = int(time.time() * 1000)
        points = []
        for key, values in series.items():
            recorded = set() if fresh else {_point(m.step, m.value) for m in self._client.get_metric_history(run_id, key)}
            points += [Metric(key, _metric_value(v), now, step) for step, v in values if _point(step, v) not in recorded]
        self._log_batch(run_id, metrics=points)

    def _log_inputs(self, run_id: str, datasets: Sequence[DatasetInput]) -> None:
        if datasets:  # the store lists a dataset input once, also when logged again
            self._client.log_inputs(run_id, datasets=list(datasets))

    def _log_artifacts(self, run_id: str, local: Path, artifact_path: str | None) -> None:
        if local.is_dir():
            self._client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self._client.log_artifact(run_id, str(local), artifact_path)

    # --------------------------------------------------------------- the chain run

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any], config_file: Path | None,
              resume_run_id: str | None = None, parent_run_id: str | None = None,
              resolved_config: Mapping[str, Any] | None = None, datasets: Sequence[DatasetInput] = (),
              start_time: float | None = None) -> str:
        """Start the chain's parent run, or resume run ``resume_run_id`` (a re-submitted chain); returns its id.

        ``parent_run_id`` nests the chain run itself under another run (a Tune sweep's run: sweep ->
        trial chains -> tasks).

        Params are flattened (nested dicts -> dotted keys) and truncated to MLflow's value limit. On
        resume only params not yet logged are logged; one logged with another value raises TrackingError
        naming it, before the run is touched. Tags (git commit, package versions: the caller's) are set,
        overwriting earlier values on resume. The config file is logged under ``config/`` as written (provenance),
        and ``resolved_config``, the config that runs (``--set`` overrides applied, defaults filled in), as
        ``config/resolved.yaml``. Keys that look like secrets (``looks_secret``) are never logged, and their values
        are redacted in both config copies. ``datasets`` (every task's, from ``split_datasets``) are the run's
        inputs: the Dataset column of the runs list. ``start_time`` (unix seconds) dates a new run from when its
        chain started, for a chain logged after it ran (default: now).
        """
        if self.parent_run_id is not None:
            raise RuntimeError(f"this tracker already started run {self.parent_run_id}")
        clean_params, clean_tags = _clean_params(params), _clean_tags(tags)
        with store_errors(self._safe_uri, "resuming the chain run" if resume_run_id else "starting the chain run"):
            if resume_run_id:
                run = self._client.get_run(resume_run_id)
                if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage != "active":
                    raise TrackingError(f"run {resume_run_id} is not an active run of experiment {self.experiment_id} at {self._safe_uri}")
                if TASK_INDEX_TAG in run.data.tags:
                    raise TrackingError(f"run {resume_run_id} is a task's nested run, not a chain run")
                clean_params = self._new_params(resume_run_id, clean_params)
                self._client.update_run(resume_run_id, status="RUNNING")
                run_id = resume_run_id
            else:
                nesting = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}
                run_id = self._client.create_run(self.experiment_id, run_name=run_name, tags=nesting,
                                                 start_time=None if start_time is None else int(start_time * 1000)).info.run_id
            self.parent_run_id = run_id
            self._log_batch(run_id, params=clean_params, tags=clean_tags)
            if config_file is not None:
                self._log_config(run_id, Path(config_file))
            if resolved_config is not None:
                self._client.log_dict(run_id, redacted_mapping(resolved_config), RESOLVED_CONFIG)
            self._log_inputs(run_id, datasets)
        return run_id

    def _log_config(self, run_id: str, config_file: Path) -> None:
        try:
            redacted = redacted_text(config_file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            redacted = None  # not a text config: nothing we can redact line by line
        if redacted is None:
            self._client.log_artifact(run_id, str(config_file), "config")
            return
        with tempfile.TemporaryDirectory(prefix="procl-config-") as tmp:
            copy = Path(tmp) / config_file.name
            copy.write_text(redacted, encoding="utf-8")
            self._client.log_artifact(run_id, str(copy), "config")

    # --------------------------------------------------------------- tasks

    def _nested_runs(self, parent_id: str) -> dict[int, Run]:
        """task index -> the earliest nested run of the chain for it."""
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
        )
        by_index: dict[int, Run] = {}
        for run in runs:
            index = run.data.tags.get(TASK_INDEX_TAG)
            if index is not None and index.lstrip("-").isdigit():
                by_index.setdefault(int(index), run)
        return by_index

    def log_task(
        self,
        task_index: int,
        task_name: str,
        *,
        params: Mapping[str, Any],
        train_losses: Sequence[float],
        metrics: Mapping[str, float],
        figures: Mapping[str, Figure] | None = None,
        records: Mapping[str, Any] | None = None,
        tables: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
        artifacts: Mapping[str, Path] | None = None,
        span: tuple[float, float] | None = None,
        datasets: Sequence[DatasetInput] = (),
    ) -> str:
        """Record task ``task_index`` (0-based): its nested run, and on the chain run its metrics and artifacts.

        On the nested run: ``params``, ``train_losses[s]`` as ``train/loss`` at step s, ``datasets`` (the task's
        splits, from ``split_datasets``) as its inputs, and ``span``, (start, end) in unix seconds, as its start and
        end time (its duration in the UI; without it the run spans the logging).

        On the chain run, with step = task_index: ``metrics``; each of ``figures`` as the image of its key;
        each of ``records`` (JSON-able) as ``tasks/task_<i>/<name>``; each of ``tables`` (artifact file ->
        columns, every row so far) as an MLflow table, appending the rows it does not hold yet; each
        ``artifacts[path]`` (a local file or folder) at artifact path ``path``, with ``/task_<task_index>``
        appended unless ``path`` already ends in it.

        Idempotent: calling it again for the same task (after a resume or an outage) reuses the task's nested
        run, adds only what is missing, and overwrites the task's artifacts. Returns the nested run id.
        """
        parent = self._require_parent()
        artifacts = {Path(name).as_posix(): Path(local) for name, local in (artifacts or {}).items()}
        _check_artifacts(artifacts)
        task_dir = f"task_{task_index}"
        artifact_paths = {name: name if Path(name).name == task_dir else f"{name}/{task_dir}" for name in artifacts}
        task_params = _clean_params(params)
        parent_metrics = {k: float(v) for k, v in flatten_public(dict(metrics)).items()}
        # rendered before the first MLflow call: a figure that fails to draw cannot leave a half-logged task
        images = {key: _pixels(figure) for key, figure in (figures or {}).items()}

        with store_errors(self._safe_uri, f"logging task {task_index} ({task_name})"):
            existing = self._nested_runs(parent).get(task_index)
            # a changed param is refused before the task's finished run is reopened
            new_params = task_params if existing is None else self._new_params(existing.info.run_id, task_params)
            nested = self._open_task_run(parent, task_index, task_name, existing, span)
            try:
                self._log_batch(nested, params=new_params)
                self._log_inputs(nested, datasets)
                self._log_missing_points(nested, {LOSS_METRIC: list(enumerate(train_losses))}, fresh=existing is None)

                self._log_missing_points(parent, {k: [(task_index, v)] for k, v in parent_metrics.items()}, fresh=False)
                for name, record in (records or {}).items():
                    self._client.log_dict(parent, record, f"tasks/{task_dir}/{name}")
                for name, local in artifacts.items():
                    self._log_artifacts(parent, Path(local), artifact_paths[name])
                self._log_images(parent, images, task_index)
                for artifact_file, columns in (tables or {}).items():
                    self._log_missing_rows(parent, artifact_file, columns)
                last = self._client.get_run(parent).data.tags.get(LAST_TASK_TAG)
                if last is None or int(last) < task_index:
                    self._client.set_tag(parent, LAST_TASK_TAG, str(task_index))
                self._client.set_terminated(nested, "FINISHED", end_time=None if span is None else int(span[1] * 1000))
                self._open_nested = None
            except BaseException:
                self._end_quietly(nested, "FAILED")
                raise
        return nested

    def _log_images(self, run_id: str, images: Mapping[str, np.ndarray], step: int) -> None:
        """Each image under its key at `step`, the task index: the UI shows each key's history with a step
        slider. A (key, step) the run already has is not logged again (a re-logged task)."""
        logged = {entry.path.rsplit("/", 1)[-1] for entry in self._client.list_artifacts(run_id, "images")}
        for key, pixels in images.items():
            if not any(name.startswith(f"{key}+step+{step}+") for name in logged):
                self._client.log_image(run_id, pixels, key=key, step=step)

    def _log_missing_rows(self, run_id: str, artifact_file: str, columns: Mapping[str, Sequence[Any]]) -> None:
        """The rows of `columns` beyond those the run's table `artifact_file` holds (log_table appends to it):
        a table of rows that are final once written, such as the accuracy matrix's, grows by the new ones."""
        held = 0
        if any(entry.path == artifact_file for entry in self._client.list_artifacts(run_id, Path(artifact_file).parent.as_posix())):
            with tempfile.TemporaryDirectory(prefix="procl-table-") as tmp:
                held = len(json.loads(Path(self._client.download_artifacts(run_id, artifact_file, tmp)).read_text())["data"])
        rows = len(next(iter(columns.values()), []))
        if held < rows:
            self._client.log_table(run_id, data={name: list(values)[held:] for name, values in columns.items()}, artifact_file=artifact_file)

    def log_artifacts(self, artifacts: Mapping[str, Path]) -> None:
        """Chain-level artifacts on the parent run: ``artifacts[path]`` (a local file or folder) goes under
        artifact path ``path`` (a folder's contents, or the file by its name), overwriting a previous copy."""
        parent = self._require_parent()
        artifacts = {Path(name).as_posix(): Path(local) for name, local in artifacts.items()}
        _check_artifacts(artifacts)
        with store_errors(self._safe_uri, "logging chain artifacts"):
            for name, local in artifacts.items():
                self._log_artifacts(parent, local, name)

    def log_summary(self, metrics: Mapping[str, float], tags: Mapping[str, Any] | None = None) -> None:
        """Final metrics (step 0) and tags on the parent run, e.g. a sweep's best objective."""
        parent = self._require_parent()
        now = int(time.time() * 1000)
        with store_errors(self._safe_uri, "logging the summary"):
            self._log_batch(parent, metrics=[Metric(k, _metric_value(v), now, 0) for k, v in metrics.items()],
                            tags=_clean_tags(tags or {}))

    def end_running_children(self, status: str, tags: Mapping[str, Any]) -> None:
        """End the parent's nested runs still RUNNING (their process was stopped from outside, e.g. a Tune
        trial stopped early) as ``status`` with ``tags``."""
        parent = self._require_parent()
        with store_errors(self._safe_uri, "ending stopped nested runs"):
            running = self._client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and attributes.status = 'RUNNING'",
                run_view_type=ViewType.ACTIVE_ONLY,
            )
            for run in running:
                self._log_batch(run.info.run_id, tags=_clean_tags(tags))
                self._client.set_terminated(run.info.run_id, status)

    def _open_task_run(self, parent: str, task_index: int, task_name: str, existing: Run | None,
                       span: tuple[float, float] | None) -> str:
        if existing is None:
            tags = {MLFLOW_PARENT_RUN_ID: parent, TASK_INDEX_TAG: str(task_index), TASK_NAME_TAG: task_name}
            run_id = self._client.create_run(self.experiment_id, tags=tags, run_name=f"task_{task_index}-{task_name}",
                                             start_time=None if span is None else int(span[0] * 1000)).info.run_id
        else:
            recorded = existing.data.tags.get(TASK_NAME_TAG)
            if recorded != task_name:
                raise TrackingError(f"task {task_index} of run {parent} was logged as {recorded!r}, not {task_name!r}")
            run_id = existing.info.run_id
            if existing.info.status != "RUNNING":
                self._client.update_run(run_id, status="RUNNING")
        self._open_nested = run_id
        return run_id

    # --------------------------------------------------------------- the end

    def _end_quietly(self, run_id: str, status: str) -> None:
        """Best effort while another error is on its way (the store may be the thing that failed)."""
        try:
            self._client.set_terminated(run_id, status)
        except Exception as exc:
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, error_line(exc))
        else:
            if self._open_nested == run_id:
                self._open_nested = None

    def finish(self, status: str = "FINISHED") -> None:
        """End the chain run (and a task run left open by a failed ``log_task``) with ``status``."""
        if status not in _END_STATUSES:
            raise ValueError(f"a run ends as one of {', '.join(_END_STATUSES)}, not {status!r}")
        if self.parent_run_id is None or self._finished:
            return
        with store_errors(self._safe_uri, f"ending the chain run as {status}"):
            if self._open_nested is not None:
                self._client.set_terminated(self._open_nested, status)
                self._open_nested = None
            self._client.set_terminated(self.parent_run_id, status)
        self._finished = True

    def __enter__(self) -> ChainTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.finish("FINISHED")
            return
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            if self.parent_run_id is not None and not self._finished:
                self._client.set_tag(self.parent_run_id, "error", _truncate(error_line(exc), MAX_TAG_VAL_LENGTH))
            self.finish(status)
        except Exception as err:  # never hide the chain's own error behind a tracking one
            log.warning("could not mark the chain run %s: %s", status, error_line(err))
