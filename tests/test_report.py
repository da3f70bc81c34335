"""`procl report` on a real MLflow store holding chains logged as the chain's driver logs them
(`pipeline.chain._log_task` through ChainTracker), with known accuracy matrices: the tables, the JSON, the
figure, filters and the errors. The end-to-end chain test runs it on a store a real chain wrote."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.chain import _log_task
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.manifest import Manifest, TaskRecord
from pipeline.mlflow_store import default_tracking_uri
from pipeline.report import mean_std, read_chains
from pipeline.tracking import KIND_TAG, ORDER_TAG, STREAM_TAG, ChainTracker
from procl import metrics
from procl.checkpoint import META_FILE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # cl_table's row labels
nan = math.nan
NAMES = ["amazon", "bbc"]
# (strategy, order, seed) -> the test matrix of its 2-task chain; validation scores are test - 0.1
MATRICES = {
    ("seq_lora", "order1", 0): [[0.2, 0.3], [0.8, nan], [0.5, 0.9]],
    ("seq_lora", "order1", 1): [[0.2, 0.3], [0.7, nan], [0.6, 0.8]],
    ("procl", "order1", 0): [[0.2, 0.3], [0.8, nan], [0.75, 0.85]],
}


def log_chain(folder, strategy: str, order: str, seed: int, matrix: list[list[float]], status: str = "FINISHED") -> str:
    """A 2-task chain in the MLflow store of output_dir `folder`, logged task by task as the driver does."""
    name = f"{strategy}-{order}-{seed}"
    config = load_config(None, [f"output_dir={folder}", f"run_name={name}", f"strategy.name={strategy}", f"training.seed={seed}"])
    config.run_folder().local_path.mkdir(parents=True)
    (config.run_folder().local_path / "manifest.json").write_text("{}")
    zero_shot = dict(zip(NAMES, matrix[0]))
    manifest = Manifest("0", NAMES, zero_shot={"test": zero_shot, "validation": zero_shot})
    tracker = ChainTracker(default_tracking_uri(folder), "procl", folder)
    tracker.start(name, config.model_dump(mode="json"), {KIND_TAG: "chain", STREAM_TAG: "tiny", ORDER_TAG: order}, None)
    for task, row in enumerate(matrix[1:]):
        state_dir = config.run_folder().local_path / f"task_{task}"
        state_dir.mkdir()
        (state_dir / META_FILE).write_text("{}")
        test = {n: v for n, v in zip(NAMES, row) if not math.isnan(v)}
        record = TaskRecord(task, NAMES[task], str(state_dir), "0", test, {n: v - 0.1 for n, v in test.items()}, [1.0, 0.5])
        manifest.record(record)
        _log_task(tracker, manifest, record, config, [])
    tracker.finish(status)
    return tracker.parent_run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    for (strategy, order, seed), matrix in MATRICES.items():
        log_chain(folder, strategy, order, seed, matrix)
    log_chain(folder, "o_lora", "order1", 0, MATRICES[("procl", "order1", 0)][:2], status="KILLED")  # stopped: not a result
    return folder


def test_the_report_reads_every_finished_chain_back_with_its_matrices(store):
    chains = read_chains(default_tracking_uri(store))
    assert [(c.label, c.order, c.seed) for c in chains] == [("seq_lora", "order1", "0"), ("seq_lora", "order1", "1"), ("procl", "order1", "0")]
    for chain in chains:
        expected = MATRICES[(chain.label, chain.order, int(chain.seed))]
        assert chain.stream == "tiny" and chain.tasks == NAMES
        np.testing.assert_allclose(chain.test, expected)
        np.testing.assert_allclose(chain.validation[1:], np.array(expected[1:]) - 0.1)
        assert chain.summary("validation")["average_accuracy"] == pytest.approx(metrics.average_accuracy(expected) - 0.1)


def test_the_report_prints_a_table_per_stream_with_a_row_per_strategy(store, capsys):
    assert main(["report", str(store)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "**tiny** (test; validation AA on the validation split)"
    assert lines[2] == "| strategy | order1 seed 0 | order1 seed 1 | AA (chains) | LA | BWT | forgetting | validation AA |"
    seq = [metrics.summary(MATRICES[("seq_lora", "order1", s)]) for s in (0, 1)]
    assert lines[4] == (f"| seq_lora | {seq[0]['average_accuracy']:.3f} / {seq[0]['backward_transfer']:+.3f} | "
                        f"{seq[1]['average_accuracy']:.3f} / {seq[1]['backward_transfer']:+.3f} | "
                        f"{mean_std([s['average_accuracy'] for s in seq])} (2) | {mean_std([s['learning_accuracy'] for s in seq])} | "
                        f"{mean_std([s['backward_transfer'] for s in seq], signed=True)} | {mean_std([s['forgetting'] for s in seq])} | "
                        f"{mean_std([s['average_accuracy'] - 0.1 for s in seq])} |")
    assert lines[5].startswith("| procl | 0.800 / -0.050 |  | 0.800 (1) |")  # no seed-1 chain: an empty cell
    assert "o_lora" not in out  # the KILLED chain


def test_the_report_filters_splits_by_params_and_writes_its_files(store, tmp_path, capsys):
    assert main(["report", default_tracking_uri(store), "--filter", "params.`training.seed` = '1'", "--by", "training.seed",
                 "--json", "--out", str(tmp_path / "report")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(c["label"], c["test_summary"]["average_accuracy"]) for c in report["chains"]] == [("seq_lora training.seed=1", pytest.approx(0.7))]
    assert report["chains"][0]["test"][1] == [0.7, None]  # NaN as null
    assert (tmp_path / "report" / "report.md").read_text().startswith("**tiny**")
    assert (tmp_path / "report" / "comparison.png").read_bytes().startswith(b"\x89PNG")


def test_the_report_says_what_it_could_not_find(store, tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path}: no MLflow store here" in capsys.readouterr().err
    assert main(["report", str(store), "--experiment", "nope"]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err
    assert main(["report", str(store), "--filter", "params.`training.seed` = '7'"]) == 2
    assert "no finished chain in experiment 'procl' matching" in capsys.readouterr().err


@pytest.mark.integration
def test_cl_quality_logs_its_chains_to_mlflow_and_reports_them_from_there(tmp_path):
    """benchmarks/cl_quality.py's bare chains are chain runs of `<out>/mlflow.db`, logged by the chain's code: its
    table is `procl report <out>`'s, and a chain redone after a stop (logged, but not yet in runs.jsonl) is logged
    into its earlier run, not beside it."""
    import mlflow

    from cl_table import LABELS
    from pipeline.report import markdown

    out = tmp_path / "clq"
    command = [sys.executable, str(ROOT / "benchmarks" / "cl_quality.py"), "--out", str(out), "--strategies", "seq_lora",
               "--orders", "order1", "--seeds", "0", "--train", "8", "--validation", "2", "--test", "4",
               "--set", "model.name=tiny-llama", "--set", "stream.max_tasks=2"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    chains = read_chains(default_tracking_uri(out))
    assert [(c.label, c.order, c.seed, c.stream) for c in chains] == [("seq_lora", "order1", "0", "standard")]
    for chain, record in zip(chains, records):
        np.testing.assert_allclose(chain.test, record["matrix"])
        np.testing.assert_allclose(chain.validation, record["validation_matrix"])
    assert markdown(chains, LABELS) in first.stdout

    client = mlflow.MlflowClient(default_tracking_uri(out))
    for chain in chains:
        tasks = client.search_runs([client.get_run(chain.run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{chain.run_id}'")
        assert len(tasks) == 2
        for task in tasks:
            steps = int(task.data.params["optimizer_steps"])
            assert steps > 0 and len(client.get_metric_history(task.info.run_id, "train/loss")) == steps
            assert {i.tags[0].value for i in task.inputs.dataset_inputs} == {"training", "validation", "testing"}
            assert task.info.end_time > task.info.start_time

    (out / "runs.jsonl").write_text("")  # stopped after logging the chain, before recording it
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "seq_lora   order1 seed 0: AA" in second.stdout  # redone
    assert [c.run_id for c in read_chains(default_tracking_uri(out))] == [c.run_id for c in chains]

    # the results folder continued on a fresh checkout: runs.jsonl kept, the store (ignored by git) gone
    (out / "mlflow.db").unlink()
    third = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert third.returncode == 0, third.stderr[-3000:]
    assert "the table has them from runs.jsonl" in third.stdout and markdown(chains, LABELS).splitlines()[-1] in third.stdout
