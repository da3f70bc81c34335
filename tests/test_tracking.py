"""ChainTracker, the store checks and the redaction of secrets against a real MLflow (sqlite store in a temp folder; no mocks).

One sqlite store serves the whole module (creating it runs MLflow's migrations, seconds), each test
in its own experiment and run folder; the 3-task chain is logged once and inspected by several tests.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import socket
import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import plots
from pipeline.mlflow_store import TrackingError, default_tracking_uri
from pipeline.redaction import looks_secret
from pipeline.tracking import LOSS_METRIC, MATRIX_TABLE, RESOLVED_CONFIG, ChainTracker, split_datasets
from procl import metrics as cl_metrics

nan = math.nan
NAMES = ["sst2", "boolq", "yahoo"]
# zero-shot row + 3 trained rows; yahoo not scored after task 1 (NaN), scored ahead after task 2
MATRIX = [
    [0.50, 0.40, 0.10],
    [0.90, 0.45, nan],
    [0.80, 0.85, 0.20],
    [0.70, 0.80, 0.90],
]
USAGE = [  # ProCL's task_slot_usage: tasks 2 and 3, layer path -> per-slot usage
    {"layers.0.q_proj": [0.6, 0.2, 0.1, 0.1], "layers.1.q_proj": [0.5, 0.3, 0.1, 0.1]},
    {"layers.0.q_proj": [0.1, 0.1, 0.7, 0.1], "layers.1.q_proj": [0.1, 0.2, 0.5, 0.2]},
]
PARAMS = {
    "strategy": "procl",
    "procl": {"num_slots": 4, "key_dim": 16, "tau": 1.0},
    "eval": {"max_new_tokens": 8},
    "hf_token": "hf_SECRET1",
    "model": {"name": "tiny", "api_key": "sk-SECRET2"},
    "sources": [{"name": "hub", "auth_token": "SECRET6"}, {"name": "local"}],
    "notes": "x" * 7000,  # over MLflow's param value limit
}
TAGS = {"git_commit": "abc123", "versions": {"mlflow": "3.17.2"}, "MLFLOW_TRACKING_TOKEN": "SECRET3"}
CONFIG = "strategy: procl\nprocl:\n  key_dim: 16\nmlflow:\n  tracking_token: SECRET4\n  password = SECRET5\n"
# the config as it ran (--set values applied), logged beside the file
RESOLVED = {"strategy": {"name": "procl", "procl": {"key_dim": 16}}, "training": {"lr": 0.002},
            "tracking": {"auth": {"api_key": "SECRET7"}}, "sources": [{"name": "hub", "hf_token": "SECRET8"}]}
SECRETS = ("SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5", "SECRET6", "SECRET7", "SECRET8")
PNG = b"\x89PNG\r\n\x1a\n"
# each task's records (the validation split of yahoo is empty: no dataset for it)
SPLITS = {name: {"train": [{"text": f"{name} example {n}", "target": "yes"} for n in range(3 + index)],
                 "validation": [] if name == "yahoo" else [{"text": f"{name} held out", "target": "no"}],
                 "test": [{"text": f"{name} test {n}", "target": "no"} for n in range(2)]} for index, name in enumerate(NAMES)}


def datasets(name: str) -> list:
    return split_datasets(name, SPLITS[name], {"type": "bundled", "dataset": name})


def losses(task: int) -> list[float]:
    return [2.0 - 0.1 * step - 0.01 * task for step in range(5)]


def task_metrics(matrix: list[list[float]]) -> dict[str, float]:
    row = matrix[-1]
    scores = {f"test/{name}": row[j] for j, name in enumerate(NAMES[: len(matrix) - 1])}
    return scores | {
        "average_accuracy": cl_metrics.average_accuracy(matrix),
        "backward_transfer": cl_metrics.backward_transfer(matrix),
        "forgetting": cl_metrics.forgetting(matrix),
    }


ROW_NAMES = ["zero-shot", "after sst2", "after boolq", "after yahoo"]


def figures(task: int) -> dict:
    """The chain's figures after `task`, drawn by pipeline.plots."""
    matrix = MATRIX[: task + 2]
    drawn = {"accuracy_matrix": plots.accuracy_matrix_heatmap(matrix, NAMES), "forgetting": plots.forgetting_plot(matrix, NAMES),
             "loss_curve": plots.loss_curve_plot({NAMES[t]: losses(t) for t in range(task + 1)})}
    if task:  # ProCL's slot usage from its second task on
        drawn["slot_usage"] = plots.slot_usage_plot(USAGE[:task], NAMES)
    return drawn


def matrix_columns(task: int) -> dict[str, list]:
    rows = [[None if math.isnan(v) else v for v in row] for row in MATRIX[: task + 2]]
    return {"after": ROW_NAMES[: task + 2]} | {name: [row[j] for row in rows] for j, name in enumerate(NAMES)}


def log(tracker: ChainTracker, task: int, adapter: Path, lr: float = 1e-3, artifact_path: str = "checkpoints") -> str:
    return tracker.log_task(
        task,
        NAMES[task],
        params={"lr": lr, "steps": 5},
        train_losses=losses(task),
        metrics=task_metrics(MATRIX[: task + 2]),
        figures=figures(task),
        records={"accuracy_matrix.json": matrix_columns(task)} | ({"slot_usage.json": USAGE[:task]} if task else {}),
        tables={MATRIX_TABLE: matrix_columns(task)},
        artifacts={artifact_path: adapter},
        datasets=datasets(NAMES[task]),
    )


def adapter_dir(root: Path) -> Path:
    folder = root / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return folder


def artifact_root(client: MlflowClient, run_id: str) -> Path:
    uri = client.get_run(run_id).info.artifact_uri
    assert uri.startswith("file:")
    return Path(unquote(urlsplit(uri).path))


def image_steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """key -> the steps of its logged images (MLflow names them images/<key>+step+<step>+timestamp+...)."""
    steps: dict[str, list[int]] = {}
    for entry in client.list_artifacts(run_id, "images"):
        key, _, step, *_ = entry.path.removeprefix("images/").split("+")
        if entry.path.endswith(".png") and not key.endswith("compressed"):
            steps.setdefault(key, []).append(int(step))
    return {key: sorted(value) for key, value in steps.items()}


def matrix_table(client: MlflowClient, run_id: str) -> dict:
    return json.loads((artifact_root(client, run_id) / MATRIX_TABLE).read_text())


def nested_runs(client: MlflowClient, experiment_id: str, parent_id: str):
    return client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = default_tracking_uri(tmp_path_factory.mktemp("store"))
    MlflowClient(uri).search_experiments()  # MLflow creates and migrates the sqlite schema once
    return uri


@pytest.fixture(scope="module")
def chain(store, tmp_path_factory):
    """A 3-task chain logged through the context manager."""
    run_dir = tmp_path_factory.mktemp("chain")
    config = run_dir / "chain.yaml"
    config.write_text(CONFIG)
    adapter = adapter_dir(run_dir)
    with ChainTracker(store, "chain", run_dir) as tracker:
        parent = tracker.start("demo-chain", PARAMS, TAGS, config, resolved_config=RESOLVED,
                               datasets=[entry for name in NAMES for entry in datasets(name)])
        # "checkpoints" gets the task folder appended; "checkpoints/task_2" already names it
        nested = [log(tracker, 0, adapter), log(tracker, 1, adapter), log(tracker, 2, adapter, artifact_path="checkpoints/task_2")]
        (run_dir / "manifest.json").write_text('{"tasks": 3}')
        tracker.log_artifacts({"adapter": adapter, "manifest": run_dir / "manifest.json"})
    client = MlflowClient(store)
    return client, tracker, parent, nested, run_dir


def test_default_tracking_uri(tmp_path):
    assert default_tracking_uri(tmp_path / "run") == f"sqlite:////{(tmp_path / 'run' / 'mlflow.db').as_posix().lstrip('/')}"


def test_chain_runs_and_metrics(chain):
    client, tracker, parent, nested, _ = chain
    children = nested_runs(client, tracker.experiment_id, parent)
    assert len(client.search_runs([tracker.experiment_id])) == 4
    assert sorted(r.info.run_id for r in children) == sorted(nested)
    assert {(r.data.tags["task_index"], r.data.tags["task_name"]) for r in children} == {("0", "sst2"), ("1", "boolq"), ("2", "yahoo")}
    assert all(client.get_run(run_id).info.status == "FINISHED" for run_id in [parent, *nested])

    history = client.get_metric_history(parent, "average_accuracy")
    assert [(m.step, m.value) for m in history] == [(t, pytest.approx(task_metrics(MATRIX[: t + 2])["average_accuracy"])) for t in range(3)]
    assert [m.step for m in client.get_metric_history(parent, "test/sst2")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(parent, "forgetting")] == [0, 1, 2]
    loss = client.get_metric_history(nested[1], LOSS_METRIC)
    assert [(m.step, m.value) for m in loss] == [(s, pytest.approx(v)) for s, v in enumerate(losses(1))]
    assert client.get_run(nested[1]).data.params == {"lr": "0.001", "steps": "5"}
    assert client.get_run(parent).data.tags["last_task_index"] == "2"


def test_chain_artifacts(chain):
    client, _, parent, _, run_dir = chain
    root = artifact_root(client, parent)
    assert root.is_relative_to(run_dir / "mlartifacts")  # not ./mlruns of the working directory

    # the records of each task under tasks/task_<i>/
    assert json.loads((root / "tasks/task_0/accuracy_matrix.json").read_text()) == matrix_columns(0)
    assert json.loads((root / "tasks/task_2/slot_usage.json").read_text()) == USAGE
    assert not (root / "tasks/task_0/slot_usage.json").exists()  # task 1 has no program memory

    # the figures as image history, one image per task; slot usage from task 2 on
    assert image_steps(client, parent) == {"accuracy_matrix": [0, 1, 2], "forgetting": [0, 1, 2], "loss_curve": [0, 1, 2],
                                          "slot_usage": [1, 2]}
    pngs = [entry.path for entry in client.list_artifacts(parent, "images") if entry.path.endswith(".png")]
    assert all((root / name).read_bytes().startswith(PNG) for name in pngs)
    assert not list(root.glob("*.png")) and not list(root.glob("tasks/*/*.png"))  # no file copies beside them

    # the matrix as an MLflow table (a row per task trained, NaN as null), which the UI lists as a table
    table = matrix_table(client, parent)
    assert table["columns"] == ["after", *NAMES]
    assert table["data"] == [[name, *[None if math.isnan(v) else v for v in row]] for name, row in zip(ROW_NAMES, MATRIX)]
    assert {"path": MATRIX_TABLE, "type": "table"} in json.loads(client.get_run(parent).data.tags["mlflow.loggedArtifacts"])
    for task in range(3):
        assert (root / f"checkpoints/task_{task}/adapter_config.json").read_text() == '{"r": 8}'
        assert (root / f"checkpoints/task_{task}/adapter_model.safetensors").stat().st_size == 64
    assert not (root / "checkpoints/task_2/task_2").exists()
    assert (root / "adapter/adapter_config.json").exists() and (root / "manifest/manifest.json").exists()


def test_secrets_filtered(chain):
    client, _, parent, _, _ = chain
    run = client.get_run(parent)
    params, tags = run.data.params, run.data.tags
    logged = json.dumps([params, tags])
    assert not any(secret in logged for secret in SECRETS)
    assert "hf_token" not in params and "model.api_key" not in params and "MLFLOW_TRACKING_TOKEN" not in tags
    # hyperparameters whose names merely contain "key"/"token" survive
    assert params["procl.key_dim"] == "16" and params["eval.max_new_tokens"] == "8" and params["model.name"] == "tiny"
    assert params["sources.0.name"] == "hub" and params["sources.1.name"] == "local"
    assert tags["git_commit"] == "abc123" and tags["versions.mlflow"] == "3.17.2"
    assert len(params["notes"]) <= 6000 and params["notes"].endswith("[truncated]")

    config = (artifact_root(client, parent) / "config/chain.yaml").read_text()
    assert not any(secret in config for secret in SECRETS)
    assert "key_dim: 16" in config and 'tracking_token: "<redacted>"' in config

    resolved = yaml.safe_load((artifact_root(client, parent) / RESOLVED_CONFIG).read_text())
    assert resolved["training"]["lr"] == 0.002 and resolved["strategy"] == RESOLVED["strategy"]
    assert resolved["tracking"]["auth"]["api_key"] == "<redacted>" and resolved["sources"] == [{"name": "hub", "hf_token": "<redacted>"}]


@pytest.mark.parametrize(
    ("key", "secret"),
    [("hf_token", True), ("MLFLOW_TRACKING_TOKEN", True), ("apiKey", True), ("AWS_SECRET_ACCESS_KEY", True),
     ("db.password", True), ("auth.token.value", True), ("procl.key_dim", False), ("max_new_tokens", False),
     ("pad_token_id", False), ("tokenizer", False), ("test/turkey", False)],
)
def test_looks_secret(key, secret):
    assert looks_secret(key) is secret


def test_resume_reuses_runs_and_refuses_changed_params(store, tmp_path):
    adapter = adapter_dir(tmp_path)
    first = ChainTracker(store, "resume", tmp_path)
    parent = first.start("chain", {"lr": 1e-3, "seed": 0}, {}, None)
    log(first, 0, adapter)
    log(first, 1, adapter)
    # the driver dies here: the parent stays RUNNING; an interrupted attempt left task 2's run open
    client = MlflowClient(store)
    interrupted = client.create_run(
        first.experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent, "task_index": "2", "task_name": "yahoo"}
    ).info.run_id

    second = ChainTracker(store, "resume", tmp_path)
    assert second.start("chain", {"lr": 1e-3, "seed": 0, "new_param": 1}, {}, None, resume_run_id=parent) == parent
    log(second, 1, adapter)  # re-logged from the local manifest after the resume
    assert log(second, 2, adapter) == interrupted
    second.finish()

    children = nested_runs(client, first.experiment_id, parent)
    assert sorted(r.data.tags["task_index"] for r in children) == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" for r in children) and client.get_run(parent).info.status == "FINISHED"
    task_1 = next(r.info.run_id for r in children if r.data.tags["task_index"] == "1")
    assert [m.step for m in client.get_metric_history(task_1, LOSS_METRIC)] == [0, 1, 2, 3, 4]  # no duplicated points
    assert [m.step for m in client.get_metric_history(parent, "average_accuracy")] == [0, 1, 2]
    assert client.get_run(parent).data.params == {"lr": "0.001", "seed": "0", "new_param": "1"}
    # re-logging task 1 added no image and no table row: each figure once per task, the matrix row by row
    assert image_steps(client, parent) == {"accuracy_matrix": [0, 1, 2], "forgetting": [0, 1, 2], "loss_curve": [0, 1, 2],
                                          "slot_usage": [1, 2]}
    assert [row[0] for row in matrix_table(client, parent)["data"]] == ROW_NAMES
    assert len(client.get_run(task_1).inputs.dataset_inputs) == 3  # nor a dataset input

    third = ChainTracker(store, "resume", tmp_path)
    with pytest.raises(TrackingError, match="lr"):
        third.start("chain", {"lr": 5e-4, "seed": 0}, {}, None, resume_run_id=parent)
    assert client.get_run(parent).info.status == "FINISHED"  # refused before the run was touched

    with ChainTracker(store, "resume", tmp_path) as fourth:
        fourth.start("chain", {"lr": 1e-3, "seed": 0}, {}, None, resume_run_id=parent)
        with pytest.raises(TrackingError, match="lr"):
            log(fourth, 0, adapter, lr=1.0)  # a task's param changed
    task_0 = next(r.info.run_id for r in children if r.data.tags["task_index"] == "0")
    assert client.get_run(task_0).info.status == "FINISHED"  # the refused re-log did not reopen it


def inputs(client: MlflowClient, run_id: str) -> dict[tuple[str, str], object]:
    """(dataset name, context) -> the dataset of each of the run's dataset inputs."""
    entries = client.get_run(run_id).inputs.dataset_inputs
    assert all(len(entry.tags) == 1 and entry.tags[0].key == "mlflow.data.context" for entry in entries)
    return {(entry.dataset.name, entry.tags[0].value): entry.dataset for entry in entries}


def test_each_task_s_splits_are_datasets_named_by_the_task_with_their_role_as_context(chain):
    client, tracker, parent, nested, _ = chain
    splits = {"train": "training", "validation": "validation", "test": "testing"}
    expected = {(name, splits[split]) for name in NAMES for split in splits if SPLITS[name][split]}
    chain_inputs = inputs(client, parent)
    assert set(chain_inputs) == expected  # the chain run lists every task's data; yahoo has no validation records
    for index, run_id in enumerate(nested):  # a task's run lists its own
        assert set(inputs(client, run_id)) == {key for key in expected if key[0] == NAMES[index]}
    train = {name: chain_inputs[(name, "training")] for name in NAMES}
    assert len({dataset.digest for dataset in train.values()}) == 3  # the digest follows the records
    assert [json.loads(train[name].profile)["num_rows"] for name in NAMES] == [3, 4, 5]
    assert json.loads(train["boolq"].source)["tags"] == {"procl.source.type": "bundled", "procl.source.dataset": "boolq"}
    assert {column["name"] for column in json.loads(train["sst2"].schema)["mlflow_colspec"]} == {"text", "target"}


def test_a_task_run_spans_the_task_it_records(store, tmp_path):
    """The nested run starts and ends when the task did (the UI's duration), not when it was logged."""
    tracker = ChainTracker(store, "span", tmp_path)
    tracker.start("chain", {"lr": 1e-3}, {}, None)
    started = time.time() - 3600  # an hour ago, as when a chain re-logs a task after an outage
    nested = tracker.log_task(0, NAMES[0], params={}, train_losses=losses(0), metrics={}, span=(started, started + 42.5))
    tracker.finish()
    info = MlflowClient(store).get_run(nested).info
    assert (info.start_time, info.end_time) == (int(started * 1000), int((started + 42.5) * 1000))


def test_a_logged_task_leaves_no_figure_behind(store, tmp_path):
    """The chain's figures (reference cycles holding their pixels) are freed once each task is logged, not whenever
    the cyclic collector next runs: in the chain's driver that was rarely, and memory grew every task."""
    from matplotlib.figure import Figure

    from pipeline.chain import _log_task
    from pipeline.config import load_config
    from pipeline.manifest import Manifest, TaskRecord
    from procl.checkpoint import META_FILE

    config = load_config(None, [f"output_dir={tmp_path}", "run_name=figures"])
    config.run_folder().local_path.mkdir(parents=True)
    (config.run_folder().local_path / "manifest.json").write_text("{}")
    records = []
    for task in range(2):
        state_dir = config.run_folder().local_path / f"task_{task}"
        state_dir.mkdir()
        (state_dir / META_FILE).write_text(json.dumps({"task_slot_usage": USAGE[:task]}))
        scores = dict(zip(NAMES[: task + 1], MATRIX[task + 1]))
        records.append(TaskRecord(task, NAMES[task], str(state_dir), "0", scores, scores, losses(task)))
    manifest = Manifest("0", NAMES, zero_shot={"test": dict(zip(NAMES, MATRIX[0])), "validation": dict(zip(NAMES, MATRIX[0]))},
                        tasks=records)
    tracker = ChainTracker(store, "figures", tmp_path)
    tracker.start("chain", {"lr": 1e-3}, {}, None)
    gc.collect()
    gc.disable()  # no automatic collection may hide what logging a task leaves
    try:
        for record in records:
            _log_task(tracker, manifest, record, config, datasets(record.name))
        figures = [o for o in gc.get_objects() if type(o) is Figure]  # type(): isinstance probes lazy module attributes
    finally:
        gc.enable()
        tracker.finish()
    assert figures == []
    assert image_steps(MlflowClient(store), tracker.parent_run_id) == {"accuracy_matrix": [0, 1], "forgetting": [0, 1],
                                                                       "loss_curve": [0, 1], "slot_usage": [1]}


def test_missing_sqlite_folder_is_refused(tmp_path):
    uri = "sqlite:////nonexistent-dir/x/mlflow.db"
    existed = Path("/nonexistent-dir").exists()
    with pytest.raises(TrackingError) as caught:
        ChainTracker(uri, "x", tmp_path)
    assert uri in str(caught.value)
    assert Path("/nonexistent-dir").exists() == existed  # MLflow would have created it


def test_corrupt_sqlite_is_refused(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(TrackingError, match="mlflow.db.*(not a database|DatabaseError)"):
        ChainTracker(default_tracking_uri(tmp_path), "x", tmp_path)


def test_locked_sqlite_is_refused(store, tmp_path):
    db = Path(urlsplit(store).path[1:])
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other_writer:
        other_writer.execute("BEGIN EXCLUSIVE")
        with pytest.raises(TrackingError, match="database is locked"):
            ChainTracker(store, "locked", tmp_path)  # ~5 s (MLflow itself would wait 20 s)
        other_writer.execute("ROLLBACK")


@pytest.mark.parametrize("credentials", ["", "user:pw-SECRET@"])
def test_http_with_nothing_listening_fails_fast(tmp_path, credentials):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        ChainTracker(f"http://{credentials}127.0.0.1:{port}", "x", tmp_path)
    assert time.monotonic() - start < 30  # MLflow's own retries take minutes
    assert f"http://{'***@' if credentials else ''}127.0.0.1:{port}" in str(caught.value)
    assert "SECRET" not in str(caught.value)


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_exception_in_with_block_ends_run(store, tmp_path, error, status):
    with pytest.raises(type(error)):
        with ChainTracker(store, "failing", tmp_path) as tracker:
            parent = tracker.start("chain", {"lr": 1e-3}, {}, None)
            raise error
    run = MlflowClient(store).get_run(parent)
    assert run.info.status == status
    assert run.data.tags["error"].startswith(type(error).__name__)
