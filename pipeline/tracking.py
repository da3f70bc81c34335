"""MLflow tracking of a continual-learning chain: one parent run per chain, one nested run per task.

Layout of what a chain records (task indices are 0-based, as the chain counts them):

- parent run: the chain's params and tags, the config file under ``config/`` and the resolved config as
  ``config/resolved.yaml``; after each task, the caller's per-task metrics with step = task index; the
  figures as MLflow images with step = task index (keys ``accuracy_matrix``, ``forgetting``, ``loss_curve``
  (all tasks so far), ``slot_usage`` when given: the UI shows each key's history); the accuracy matrix as
  the table ``tables/accuracy_matrix.json``, a row per trained task; the records under ``tasks/task_<i>/``
  (``accuracy_matrix.json``, ``slot_usage.json`` when given); and each caller artifact ``artifact path ->
  local path`` under a task-specific path: ``checkpoints/task_<i>`` as given, or ``checkpoints`` ->
  ``checkpoints/task_<i>``. ``log_artifacts`` adds chain-level artifacts (final adapter, manifest).
- nested run per task (tags ``task_index``, ``task_name``, ``mlflow.parentRunId``), starting and ending
  when the task did: the task's params and its train loss as the metric ``train/loss`` with step =
  optimizer step within the task.

Everything goes through ``MlflowClient`` with explicit run ids rather than the fluent
``mlflow.start_run`` stack: the active-run stack is process-global, and the chain's driver shares its
process with Ray and possibly other MLflow users (Ray Tune callbacks), so explicit ids keep the
parent/child pairing exact. The nested-run convention (the ``mlflow.parentRunId`` tag) is MLflow's own.

``log_task`` is idempotent: it reuses the task's nested run if one exists, logs only metric points
and params not already recorded, images and table rows it does not hold yet, and writes artifacts to
task-specific paths (overwriting). A chain
that lost MLflow mid-run can therefore re-log every task from its local records with a new tracker
started with ``resume_run_id``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.rest_utils import http_request
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from pipeline import plots

log = logging.getLogger(__name__)


def _drop_sqlalchemy_tracebacks(record: logging.LogRecord) -> bool:
    """MLflow's sqlite store logs a full traceback for every database error before raising it; the
    tracker reports each one in a line of its own (TrackingError, or a warning while a run fails)."""
    return not record.getMessage().startswith("SQLAlchemy database error")


logging.getLogger("mlflow.store.db.utils").addFilter(_drop_sqlalchemy_tracebacks)

TASK_INDEX_TAG = "task_index"
TASK_NAME_TAG = "task_name"
LAST_TASK_TAG = "last_task_index"  # highest task index logged on the parent: a resumed chain can read it
LOSS_METRIC = "train/loss"
RESOLVED_CONFIG = "config/resolved.yaml"
MATRIX_TABLE = "tables/accuracy_matrix.json"  # the accuracy matrix as an MLflow table, a row per task trained
REDACTED = "<redacted>"
# MLflow's convention for a dataset input's context is the data's role ("training", "testing")
SPLIT_CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}
# A store that does not answer within this many seconds counts as unreachable: MLflow's own HTTP
# client retries 7 times with exponential backoff (~4 minutes against a closed port).
PROBE_TIMEOUT_S = 5
_TRUNCATED = "...[truncated]"
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingError(RuntimeError):
    """The MLflow store cannot be used, or a resumed run disagrees with what is being logged."""


class StoreUnusable(TrackingError, ValueError):
    """The store fails its checks before the chain starts: a setting to fix (the CLI's exit status 2)."""


def default_tracking_uri(run_dir: Path) -> str:
    """``sqlite:////<abs run_dir>/mlflow.db``: MLflow 3's recommended local store (the file store is refused)."""
    return f"sqlite:///{(Path(run_dir).expanduser().resolve() / 'mlflow.db').as_posix()}"


# ----------------------------------------------------------------------------- secrets and values

_SECRET_PARTS = ("password", "passwd", "secret", "credential")
_SECRET_LAST_WORDS = {"token", "key", "apikey", "accesskey", "privatekey", "accesstoken", "authtoken"}


def _words(segment: str) -> list[str]:
    """``MLFLOW_TRACKING_TOKEN`` -> [mlflow, tracking, token]; ``apiKey`` -> [api, key]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", segment)
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def looks_secret(key: str) -> bool:
    """Whether a param/tag/metric/config key names a secret.

    A dotted segment is secret when one of its words contains password/passwd/secret/credential, or
    when its last word is "token" or "key" (also apikey, accesskey, privatekey, accesstoken, authtoken):
    ``hf_token``, ``MLFLOW_TRACKING_TOKEN``, ``api_key``, ``apiKey``, ``AWS_SECRET_ACCESS_KEY``. Whole
    words rather than substrings keep hyperparameters such as ``procl.key_dim``, ``max_new_tokens``,
    ``pad_token_id`` and ``tokenizer`` (and a task called "turkey").
    """
    for segment in str(key).split("."):
        words = _words(segment)
        if any(part in word for word in words for part in _SECRET_PARTS):
            return True
        if words and words[-1] in _SECRET_LAST_WORDS:
            return True
    return False


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists of dicts by index: ``sources.0.name``); a secret-looking key
    drops its whole subtree. Lists holding dicts are flattened too, or str() would leak their secrets."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if looks_secret(name):
            log.info("not logging %r to MLflow: its name looks like a secret", name)
            continue
        if isinstance(value, (list, tuple)) and any(isinstance(item, Mapping) for item in value):
            value = {str(index): item for index, item in enumerate(value)}
        if isinstance(value, Mapping) and value:
            flat |= _flatten(value, name)
        else:
            flat[name] = value
    return flat


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    # str() as mlflow.log_param does, so values logged by other MLflow code compare equal on resume;
    # truncation is deterministic, so a resumed chain's truncated value matches the stored one.
    return {key: _truncate(str(value), MAX_PARAM_VAL_LENGTH) for key, value in _flatten(params).items()}


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {key: _truncate(str(value), MAX_TAG_VAL_LENGTH) for key, value in _flatten(tags).items()}


def _metric_value(value: float) -> float:
    """The value as MLflow stores it (it clamps infinities), for comparing against recorded points."""
    value = float(value)
    if math.isinf(value):
        return math.copysign(sys.float_info.max, value)
    return value


def _point(step: int, value: float) -> tuple[int, float | str]:
    value = _metric_value(value)
    return step, "nan" if math.isnan(value) else value


def _redact_uri(uri: str) -> str:
    """The URI without user:password@ (error messages name the store, never its credentials)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _cause(exc: BaseException) -> str:
    """First line of the error, without any user:password@ that MLflow's own messages repeat (and without
    SQLAlchemy's autoflush note, which comes before the database's own error, e.g. "disk is full")."""
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith("(raised as a result of")]
    first = re.sub(r"//[^/@\s]+@", "//***@", lines[0][:300]) if lines else ""
    return f"{type(exc).__name__}: {first}"


_ASSIGNMENT = re.compile(r"""^(?P<lead>\s*(?:-\s*)?["']?)(?P<key>[A-Za-z0-9_.\-]+)(?P<sep>["']?\s*[:=]\s*)(?P<value>.*?)\s*$""")


def _redacted_text(text: str) -> str | None:
    """The config text with secret-looking ``key: value`` / ``key = value`` / ``"key": value`` values
    replaced, or None when nothing needed redacting."""
    changed = False
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        match = _ASSIGNMENT.match(body)
        if match and looks_secret(match["key"]) and match["value"] not in ("", "{", "["):
            comma = "," if match["value"].endswith(",") else ""
            line = f'{match["lead"]}{match["key"]}{match["sep"]}"{REDACTED}"{comma}{line[len(body):]}'
            changed = True
        lines.append(line)
    return "".join(lines) if changed else None


def _redacted_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with the value of every secret-looking key (``looks_secret``), at any depth, replaced."""
    def redact(value: Any, key: str) -> Any:
        if looks_secret(key):
            return REDACTED
        if isinstance(value, Mapping):
            return {k: redact(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [redact(item, key) if isinstance(item, (Mapping, list, tuple)) else item for item in value]
        return value

    return redact(dict(values), "")


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

    code_source = CodeDatasetSource({f"procl.source.{key}": str(value) for key, value in _flatten(dict(source)).items()})
    inputs = []
    for split, records in splits.items():
        if records:
            dataset = from_pandas(pd.DataFrame(list(records)), source=code_source, name=task_name, targets="target")
            inputs.append(DatasetInput(Dataset(**dataset.to_dict()), [InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXTS.get(split, split))]))
    return inputs


def _matrix_json(matrix: Sequence[Sequence[float]], task_names: Sequence[str], task_index: int) -> dict[str, Any]:
    rows = [[None if math.isnan(float(v)) else float(v) for v in row] for row in matrix]  # NaN is not JSON
    return {
        "task_index": task_index,
        "task_names": list(task_names),
        "row_names": ["zero-shot"] + [f"after {name}" for name in task_names[: len(rows) - 1]],
        "rows": rows,
    }


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

    def __init__(self, tracking_uri: str, experiment: str, run_dir: Path) -> None:
        self.tracking_uri = tracking_uri
        self.run_dir = Path(run_dir).expanduser().resolve()
        self._safe_uri = _redact_uri(tracking_uri)
        self.parent_run_id: str | None = None
        self._open_nested: str | None = None
        self._finished = False
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnusable(f"cannot create the run folder {self.run_dir} for MLflow at {self._safe_uri}: {_cause(exc)}") from exc
        self._preflight()
        with self._store_errors("opening the store and its experiment"):
            self._client = MlflowClient(tracking_uri)
            self.experiment_id = self._experiment(experiment)

    # --------------------------------------------------------------- checks

    def _preflight(self) -> None:
        """Scheme-specific checks MLflow would not fail fast (or at all) on."""
        scheme = urlsplit(self.tracking_uri).scheme
        if scheme == "sqlite" and self.tracking_uri.startswith("sqlite:///"):
            path = self.tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
            if path in ("", ":memory:"):
                return
            db = Path(path)
            # MLflow 3 creates a missing folder for the db silently, so a mistyped path would start a
            # fresh, empty store somewhere else (anywhere at all when running as root).
            if not db.parent.is_dir():
                raise StoreUnusable(f"MLflow store {self._safe_uri} is not usable: its folder {db.parent} does not exist")
            # sqlite writes its journal next to the db, so the folder itself must be writable
            if not os.access(db.parent, os.W_OK | os.X_OK) or (db.exists() and not os.access(db, os.R_OK | os.W_OK)):
                raise StoreUnusable(f"MLflow store {self._safe_uri} is not usable: {db} or its folder is not writable")
            if db.exists():
                self._probe_sqlite(db)
        elif scheme in ("http", "https"):
            try:
                # MLflow's own HTTP client (its auth, TLS and proxy settings) without its retries
                http_request(get_default_host_creds(self.tracking_uri), "/health", "GET", max_retries=0, timeout=PROBE_TIMEOUT_S)
            except Exception as exc:
                raise StoreUnusable(
                    f"MLflow tracking server {self._safe_uri} is not reachable within {PROBE_TIMEOUT_S} s: {_cause(exc)}"
                ) from exc

    def _probe_sqlite(self, db: Path) -> None:
        """Take and drop the write lock: a corrupt, read-only or write-locked db fails within PROBE_TIMEOUT_S
        (MLflow's own sessions wait 20 s on a lock, and log a traceback doing it)."""
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=PROBE_TIMEOUT_S, isolation_level=None)) as connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("SELECT count(*) FROM sqlite_master")
                connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreUnusable(f"MLflow store {self._safe_uri} is not usable: {_cause(exc)}") from exc

    def _artifact_location(self) -> str | None:
        # A server chooses (and may proxy) artifact storage itself; local stores keep artifacts in the run
        # folder, not in ./mlruns of whatever the working directory happens to be.
        if urlsplit(self.tracking_uri).scheme in ("http", "https", "databricks"):
            return None
        folder = self.run_dir / "mlartifacts"
        folder.mkdir(exist_ok=True)
        return folder.as_uri()

    def _experiment(self, name: str) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self._client.create_experiment(name, artifact_location=self._artifact_location())
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another chain created it meanwhile
                    raise
                experiment = self._client.get_experiment_by_name(name)
            else:
                experiment = self._client.get_experiment(experiment_id)
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {name!r} at {self._safe_uri} is deleted; restore it (mlflow experiments restore) or use another name"
            )
        location = experiment.artifact_location
        if location.startswith("file:") and not location.startswith(self.run_dir.as_uri()):
            log.warning("experiment %r keeps its artifacts in %s, outside this chain's run folder %s", name, location, self.run_dir)
        # A write now: a read-only or locked store must fail here, not after the first task trained.
        self._client.set_experiment_tag(experiment.experiment_id, "procl.last_tracker_start", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return experiment.experiment_id

    @contextlib.contextmanager
    def _store_errors(self, what: str) -> Iterator[None]:
        """Any failure of the store surfaces as one TrackingError that names the store and the step."""
        try:
            yield
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow at {self._safe_uri} failed while {what}: {_cause(exc)}") from exc

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

    def _log_artifacts(self, run_id: str, local: Path, artifact_path: str | None) -> None:
        if local.is_dir():
            self._client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self._client.log_artifact(run_id, str(local), artifact_path)

    # --------------------------------------------------------------- the chain run

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any], config_file: Path | None,
              resume_run_id: str | None = None, parent_run_id: str | None = None,
              resolved_config: Mapping[str, Any] | None = None, datasets: Sequence[DatasetInput] = ()) -> str:
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
        inputs: the Dataset column of the runs list.
        """
        if self.parent_run_id is not None:
            raise RuntimeError(f"this tracker already started run {self.parent_run_id}")
        clean_params, clean_tags = _clean_params(params), _clean_tags(tags)
        with self._store_errors("resuming the chain run" if resume_run_id else "starting the chain run"):
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
                run_id = self._client.create_run(self.experiment_id, run_name=run_name, tags=nesting).info.run_id
            self.parent_run_id = run_id
            self._log_batch(run_id, params=clean_params, tags=clean_tags)
            if config_file is not None:
                self._log_config(run_id, Path(config_file))
            if resolved_config is not None:
                self._client.log_dict(run_id, _redacted_mapping(resolved_config), RESOLVED_CONFIG)
            if datasets:  # the store lists a dataset input once, also when logged again
                self._client.log_inputs(run_id, datasets=list(datasets))
        return run_id

    def _log_config(self, run_id: str, config_file: Path) -> None:
        try:
            redacted = _redacted_text(config_file.read_text(encoding="utf-8"))
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
        matrix: Sequence[Sequence[float]],
        task_names: Sequence[str],
        task_slot_usage: Sequence[Mapping[str, Sequence[float]]] | None = None,
        artifacts: Mapping[str, Path] | None = None,
        span: tuple[float, float] | None = None,
        datasets: Sequence[DatasetInput] = (),
    ) -> str:
        """Record task ``task_index`` (0-based): its nested run, and on the chain run its metrics and artifacts.

        ``span``, (start, end) in unix seconds, is when the task ran: the nested run's start and end time (and so
        its duration in the UI); without it the run spans the logging. ``datasets`` (the task's splits, from
        ``split_datasets``) are the nested run's inputs.

        ``matrix`` is the accuracy matrix so far (zero-shot row + one row per trained task, i.e.
        task_index + 2 rows); ``metrics`` are logged on the chain run with step = task_index;
        ``train_losses[s]`` is logged as ``train/loss`` at step s on the nested run; each
        ``artifacts[path]`` (a local file or folder) goes to artifact path ``path`` on the chain run, with
        ``/task_<task_index>`` appended unless ``path`` already ends in it (artifacts stay per task).
        Idempotent: calling it again for the same task (after a resume or an outage) reuses the task's
        nested run, adds only what is missing, and overwrites the task's artifacts. Returns the nested run id.
        """
        parent = self._require_parent()
        if len(matrix) != task_index + 2:
            raise ValueError(f"after task {task_index} the accuracy matrix needs {task_index + 2} rows (zero-shot + trained), got {len(matrix)}")
        if task_index >= len(task_names) or task_names[task_index] != task_name:
            raise ValueError(f"task {task_index} is {task_name!r} but task_names says {list(task_names)}")
        artifacts = {Path(name).as_posix(): Path(local) for name, local in (artifacts or {}).items()}
        _check_artifacts(artifacts)
        task_dir = f"task_{task_index}"
        artifact_paths = {name: name if Path(name).name == task_dir else f"{name}/{task_dir}" for name in artifacts}
        task_params = _clean_params(params)
        parent_metrics = {k: float(v) for k, v in _flatten(dict(metrics)).items()}

        with tempfile.TemporaryDirectory(prefix="procl-task-") as tmp:
            # Everything is rendered before the first MLflow call: a bad input cannot leave a half-logged task.
            snapshot, figures = Path(tmp) / "snapshot", Path(tmp) / "figures"
            snapshot.mkdir()
            figures.mkdir()
            (snapshot / "accuracy_matrix.json").write_text(json.dumps(_matrix_json(matrix, task_names, task_index), indent=1))
            plots.accuracy_matrix_heatmap(matrix, task_names, figures / "accuracy_matrix.png")
            plots.forgetting_plot(matrix, task_names, figures / "forgetting.png")
            if task_slot_usage:
                (snapshot / "slot_usage.json").write_text(json.dumps([dict(u) for u in task_slot_usage], indent=1))
                plots.slot_usage_plot(task_slot_usage, task_names, figures / "slot_usage.png")

            with self._store_errors(f"logging task {task_index} ({task_name})"):
                nested_runs = self._nested_runs(parent)
                existing = nested_runs.get(task_index)
                # a changed param is refused before the task's finished run is reopened
                new_params = task_params if existing is None else self._new_params(existing.info.run_id, task_params)
                nested = self._open_task_run(parent, task_index, task_name, existing, span)
                try:
                    self._log_batch(nested, params=new_params)
                    if datasets:
                        self._client.log_inputs(nested, datasets=list(datasets))
                    self._log_missing_points(nested, {LOSS_METRIC: list(enumerate(train_losses))}, fresh=existing is None)

                    self._log_missing_points(parent, {k: [(task_index, v)] for k, v in parent_metrics.items()}, fresh=False)
                    self._log_artifacts(parent, snapshot, f"tasks/task_{task_index}")
                    for name, local in artifacts.items():
                        self._log_artifacts(parent, Path(local), artifact_paths[name])
                    plots.loss_curve_plot(self._chain_losses(nested_runs, task_index, task_name, train_losses), figures / "loss_curve.png")
                    self._log_images(parent, figures, task_index)
                    self._log_matrix_rows(parent, matrix, task_names)
                    last = self._client.get_run(parent).data.tags.get(LAST_TASK_TAG)
                    if last is None or int(last) < task_index:
                        self._client.set_tag(parent, LAST_TASK_TAG, str(task_index))
                    self._client.set_terminated(nested, "FINISHED", end_time=None if span is None else int(span[1] * 1000))
                    self._open_nested = None
                except BaseException:
                    self._end_quietly(nested, "FAILED")
                    raise
        # A matplotlib Figure is a web of reference cycles that holds its rendered pixels in native memory, so
        # only the cyclic collector frees it; with torch and Ray loaded, full collections are rare and every
        # task's plots stayed: the driver grew 5-8 MiB per task (benchmarks/chain_memory.py). One full
        # collection per task (~0.3 s) frees them.
        gc.collect()
        return nested

    def _log_images(self, run_id: str, figures: Path, step: int) -> None:
        """Each figure as the image of its key (its file name) at `step`, the task index: the UI shows each key's
        history with a step slider. A (key, step) the run already has is not logged again (a re-logged task)."""
        from PIL import Image

        logged = {entry.path.rsplit("/", 1)[-1] for entry in self._client.list_artifacts(run_id, "images")}
        for png in sorted(figures.glob("*.png")):
            if any(name.startswith(f"{png.stem}+step+{step}+") for name in logged):
                continue
            with Image.open(png) as image:
                self._client.log_image(run_id, image.convert("RGB"), key=png.stem, step=step)

    def _log_matrix_rows(self, run_id: str, matrix: Sequence[Sequence[float]], task_names: Sequence[str]) -> None:
        """The rows of the accuracy matrix that `MATRIX_TABLE` does not hold yet (log_table appends): a row is
        final once its task is trained, so the table grows by one row per task (by two with the zero-shot row)."""
        held = 0
        if any(entry.path == MATRIX_TABLE for entry in self._client.list_artifacts(run_id, Path(MATRIX_TABLE).parent.as_posix())):
            with tempfile.TemporaryDirectory(prefix="procl-table-") as tmp:
                held = len(json.loads(Path(self._client.download_artifacts(run_id, MATRIX_TABLE, tmp)).read_text())["data"])
        rows = _matrix_json(matrix, task_names, len(matrix) - 2)
        if held >= len(rows["rows"]):
            return
        table = {"after": rows["row_names"][held:]}
        for column, name in enumerate(task_names):
            table[name] = [row[column] for row in rows["rows"][held:]]
        self._client.log_table(run_id, data=table, artifact_file=MATRIX_TABLE)

    def log_artifacts(self, artifacts: Mapping[str, Path]) -> None:
        """Chain-level artifacts on the parent run: ``artifacts[path]`` (a local file or folder) goes under
        artifact path ``path`` (a folder's contents, or the file by its name), overwriting a previous copy."""
        parent = self._require_parent()
        artifacts = {Path(name).as_posix(): Path(local) for name, local in artifacts.items()}
        _check_artifacts(artifacts)
        with self._store_errors("logging chain artifacts"):
            for name, local in artifacts.items():
                self._log_artifacts(parent, local, name)

    def log_summary(self, metrics: Mapping[str, float], tags: Mapping[str, Any] | None = None) -> None:
        """Final metrics (step 0) and tags on the parent run, e.g. a sweep's best objective."""
        parent = self._require_parent()
        now = int(time.time() * 1000)
        with self._store_errors("logging the summary"):
            self._log_batch(parent, metrics=[Metric(k, _metric_value(v), now, 0) for k, v in metrics.items()],
                            tags=_clean_tags(tags or {}))

    def end_running_children(self, status: str, tags: Mapping[str, Any]) -> None:
        """End the parent's nested runs still RUNNING (their process was stopped from outside, e.g. a Tune
        trial stopped early) as ``status`` with ``tags``."""
        parent = self._require_parent()
        with self._store_errors("ending stopped nested runs"):
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

    def _chain_losses(self, nested_runs: Mapping[int, Run], task_index: int, task_name: str,
                      train_losses: Sequence[float]) -> dict[str, list[float]]:
        """Train losses of all tasks so far in chain order, earlier ones read back from their nested runs
        (so the chain's loss curve is complete after a resume too)."""
        losses: dict[str, list[float]] = {}
        for index in sorted(i for i in nested_runs if i < task_index):
            run = nested_runs[index]
            history = {m.step: m.value for m in sorted(self._client.get_metric_history(run.info.run_id, LOSS_METRIC), key=lambda m: m.timestamp)}
            losses[run.data.tags.get(TASK_NAME_TAG, f"task_{index}")] = [history[s] for s in sorted(history)]
        losses[task_name] = list(train_losses)
        return losses

    # --------------------------------------------------------------- the end

    def _end_quietly(self, run_id: str, status: str) -> None:
        """Best effort while another error is on its way (the store may be the thing that failed)."""
        try:
            self._client.set_terminated(run_id, status)
        except Exception as exc:
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, _cause(exc))
        else:
            if self._open_nested == run_id:
                self._open_nested = None

    def finish(self, status: str = "FINISHED") -> None:
        """End the chain run (and a task run left open by a failed ``log_task``) with ``status``."""
        if status not in _END_STATUSES:
            raise ValueError(f"a run ends as one of {', '.join(_END_STATUSES)}, not {status!r}")
        if self.parent_run_id is None or self._finished:
            return
        with self._store_errors(f"ending the chain run as {status}"):
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
                self._client.set_tag(self.parent_run_id, "error", _truncate(_cause(exc), MAX_TAG_VAL_LENGTH))
            self.finish(status)
        except Exception as err:  # never hide the chain's own error behind a tracking one
            log.warning("could not mark the chain run %s: %s", status, _cause(err))
