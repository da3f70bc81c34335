"""The MLflow store a chain logs to, checked before anything trains: reachable, its schema usable, writable,
and its experiment active. A store that fails raises `StoreUnusable` (a setting to fix) or `TrackingError`,
in one line that names the store (without its credentials) and what failed."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from pipeline.redaction import error_line, redact_uri

log = logging.getLogger(__name__)

# A store that does not answer within this many seconds counts as unreachable: MLflow's own HTTP
# client retries 7 times with exponential backoff (~4 minutes against a closed port).
PROBE_TIMEOUT_S = 5


class TrackingError(RuntimeError):
    """The MLflow store cannot be used, or a resumed run disagrees with what is being logged."""


class StoreUnusable(TrackingError, ValueError):
    """The store fails its checks before the chain starts: a setting to fix (the CLI's exit status 2)."""


def _drop_sqlalchemy_tracebacks(record: logging.LogRecord) -> bool:
    """MLflow's sqlite store logs a full traceback for every database error before raising it; the
    tracker reports each one in a line of its own (TrackingError, or a warning while a run fails)."""
    return not record.getMessage().startswith("SQLAlchemy database error")


logging.getLogger("mlflow.store.db.utils").addFilter(_drop_sqlalchemy_tracebacks)
# MLflow draws a progress bar for every artifact it downloads (the tracker reads a table back each task, the
# report every chain's): noise in a chain's log and in a report; a user's own setting wins
os.environ.setdefault(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false")


def default_tracking_uri(run_dir: Path) -> str:
    """``sqlite:////<abs run_dir>/mlflow.db``: MLflow 3's recommended local store (the file store is refused)."""
    return f"sqlite:///{(Path(run_dir).expanduser().resolve() / 'mlflow.db').as_posix()}"


def check_store(tracking_uri: str) -> None:
    """Scheme-specific checks MLflow would not fail fast (or at all) on."""
    safe_uri = redact_uri(tracking_uri)
    scheme = urlsplit(tracking_uri).scheme
    if scheme == "sqlite" and tracking_uri.startswith("sqlite:///"):
        path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
        if path in ("", ":memory:"):
            return
        db = Path(path)
        # MLflow 3 creates a missing folder for the db silently, so a mistyped path would start a
        # fresh, empty store somewhere else (anywhere at all when running as root).
        if not db.parent.is_dir():
            raise StoreUnusable(f"MLflow store {safe_uri} is not usable: its folder {db.parent} does not exist")
        # sqlite writes its journal next to the db, so the folder itself must be writable
        if not os.access(db.parent, os.W_OK | os.X_OK) or (db.exists() and not os.access(db, os.R_OK | os.W_OK)):
            raise StoreUnusable(f"MLflow store {safe_uri} is not usable: {db} or its folder is not writable")
        if db.exists():
            _probe_sqlite(db, safe_uri)
    elif scheme in ("http", "https"):
        try:
            # MLflow's own HTTP client (its auth, TLS and proxy settings) without its retries
            http_request(get_default_host_creds(tracking_uri), "/health", "GET", max_retries=0, timeout=PROBE_TIMEOUT_S)
        except Exception as exc:
            raise StoreUnusable(f"MLflow tracking server {safe_uri} is not reachable within {PROBE_TIMEOUT_S} s: {error_line(exc)}") from exc


def _probe_sqlite(db: Path, safe_uri: str) -> None:
    """Take and drop the write lock: a corrupt, read-only or write-locked db fails within PROBE_TIMEOUT_S
    (MLflow's own sessions wait 20 s on a lock, and log a traceback doing it)."""
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=PROBE_TIMEOUT_S, isolation_level=None)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("SELECT count(*) FROM sqlite_master")
            connection.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise StoreUnusable(f"MLflow store {safe_uri} is not usable: {error_line(exc)}") from exc


def _artifact_location(tracking_uri: str, run_dir: Path | None) -> str | None:
    # A server chooses (and may proxy) artifact storage itself; local stores keep artifacts in the run
    # folder (or, without a local one, beside the sqlite database), not in ./mlruns of whatever the working
    # directory happens to be.
    if urlsplit(tracking_uri).scheme in ("http", "https", "databricks"):
        return None
    if run_dir is None:
        run_dir = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]).parent
    folder = run_dir / "mlartifacts"
    folder.mkdir(exist_ok=True)
    return folder.as_uri()


def open_experiment(client: MlflowClient, name: str, run_dir: Path | None) -> str:
    """The id of the active experiment `name`, created (artifacts under `run_dir` for a local store) if missing.
    Writes an experiment tag: a read-only or locked store fails here, not after the first task trained."""
    safe_uri = redact_uri(client.tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name, artifact_location=_artifact_location(client.tracking_uri, run_dir))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another chain created it meanwhile
                raise
            experiment = client.get_experiment_by_name(name)
        else:
            experiment = client.get_experiment(experiment_id)
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} at {safe_uri} is deleted; restore it (mlflow experiments restore) or use another name")
    location = experiment.artifact_location
    if run_dir is not None and location.startswith("file:") and not location.startswith(run_dir.as_uri()):
        log.warning("experiment %r keeps its artifacts in %s, outside this chain's run folder %s", name, location, run_dir)
    client.set_experiment_tag(experiment.experiment_id, "procl.last_tracker_start", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return experiment.experiment_id


@contextlib.contextmanager
def store_errors(safe_uri: str, what: str) -> Iterator[None]:
    """Any failure of the store surfaces as one TrackingError that names the store and the step."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"MLflow at {safe_uri} failed while {what}: {error_line(exc)}") from exc
