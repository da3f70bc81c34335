"""`procl tune`: search spaces are checked before Ray starts; a real sweep (Optuna + ASHA over Ray Train
V2 chains) on a tiny model logs one MLflow run per trial under the sweep's run, writes a best config
that `run` accepts, and resumes without redoing finished trials."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from test_chain import kill_driver_when, mlflow_runs, run_cli, write_config

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.tune import load_space, max_concurrent_trials, objective

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture
def base():
    return load_config(DEMO).model_dump(mode="json")


def write_space(folder: Path, text: str) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("shipped", sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml")))
def test_shipped_spaces_are_valid_for_the_demo_config(shipped, base):
    assert load_space(shipped, base).params


@pytest.mark.parametrize(("text", "expected"), [
    ("params: {strategy.procl.num_slots: {choice: [2, 3]}}", "strategy.procl.num_slots=3 would not be a valid run config"),
    ("params: {strategy.procl.num_slots: {choice: [8]}, strategy.lora.r: {choice: [4, 8]}}", "does not divide strategy.lora.r (4)"),
    ("params: {strategy.procl.tau: {uniform: [-0.5, 1.0]}}", "strategy.procl.tau: Input should be greater than 0"),
    ("params: {strategy.procl.tau: {loguniform: [0, 1]}}", "loguniform: low must be > 0"),
    ("params: {strategy.procl.slots: {choice: [2]}}", "strategy.procl.slots: Extra inputs are not permitted"),
    ("params: {training.lr: {uniform: [0.01, 0.001]}}", "expected [low, high] with low < high"),
    ("params: {training.lr: {choice: [0.1], uniform: [0.1, 0.2]}}", "give exactly one of choice, uniform"),
    ("params: {training.lr: {normal: [0, 1]}}", "params.training.lr.normal: Extra inputs are not permitted"),
    ("params: {}", "params: Dictionary should have at least 1 item"),
    ("fixed: {strategy.name: lora}\nparams: {training.lr: {choice: [0.001]}}", "unknown strategy 'lora'"),
    ("[strategy.procl.tau]", "expected a mapping with params"),
    ("params: [strategy.procl.tau]", "params: Input should be a valid dictionary"),
    ("params: {training.lr: {choice: [0.001]}}\nmax_tasks: 0", "max_tasks: Input should be greater than 0"),
])
def test_an_invalid_space_is_refused_with_the_file_and_the_reason(tmp_path, base, text, expected):
    with pytest.raises(ConfigError) as error:
        load_space(write_space(tmp_path, text), base)
    assert str(tmp_path / "space.yaml") in str(error.value) and expected in str(error.value)


def test_the_cli_refuses_a_bad_space_before_ray_starts(tmp_path):
    space = write_space(tmp_path, "params: {strategy.procl.num_slots: {choice: [3]}}")
    result = run_cli("tune", str(DEMO), "--space", str(space), "--set", f"output_dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert "num_slots=3 does not divide strategy.lora.r (8)" in result.stderr
    assert not (tmp_path / "sweeps").exists() and "Started a local Ray" not in result.stdout + result.stderr


def test_objective_is_validation_accuracy_minus_penalised_forgetting():
    matrix = [[0.2, 0.2], [0.9, math.nan], [0.5, 0.8]]  # task 1 drops 0.9 -> 0.5
    assert objective(matrix, 0.0) == pytest.approx(0.65)
    assert objective(matrix, 0.5) == pytest.approx(0.65 - 0.5 * 0.4)
    assert objective(matrix[:2], 1.0) == pytest.approx(0.9)  # nothing to forget after one task


def test_concurrent_trials_are_what_the_cluster_fits(base):
    config = load_config(DEMO)  # 2 workers x 1 CPU + 1 CPU of ingest
    assert max_concurrent_trials(config, {"CPU": 2.0}) == 1
    assert max_concurrent_trials(config, {"CPU": 9.0}) == 3
    assert max_concurrent_trials(load_config(DEMO, ["scaling.ingest_cpus=0.5"]), {"CPU": 10.0}) == 4
    gpu = load_config(DEMO, ["scaling.use_gpu=true"])
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    assert max_concurrent_trials(config, {"CPU": 1.0}) == 1  # never zero: the one trial waits for resources


def _finished_trials(sweep_dir: Path) -> dict[str, list[str]]:
    """trial id -> tensor hashes of its chain's tasks, for trials whose chain has finished (adapter exported)."""
    finished = {}
    for manifest in (sweep_dir / "trials").glob("*/manifest.json"):
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            continue  # being replaced right now
        if data.get("adapter_dir"):
            finished[manifest.parent.name] = [t["tensors_sha256"] for t in data["tasks"]]
    return finished


@pytest.mark.integration
def test_an_interrupted_sweep_resumes_logs_every_trial_once_and_writes_a_runnable_best_config(tmp_path, capsys):
    config = write_config(tmp_path, "sweep", scaling__num_workers=1)  # 2 one-worker trials side by side on 2 CPUs
    space = write_space(tmp_path, yaml.safe_dump({
        "max_tasks": 2,
        "params": {"strategy.procl.tau": {"loguniform": [0.2, 2.0]}, "strategy.procl.num_slots": {"choice": [1, 2, 4]}},
        "asha": {"grace_period": 1, "reduction_factor": 2},
    }))
    command = ["tune", str(config), "--space", str(space), "--trials", "3", "--name", "s1"]
    sweep_dir = tmp_path / "runs" / "sweeps" / "s1"
    # kill the sweep's driver (and its local Ray) once a first trial has finished its chain
    kill_driver_when(command, lambda: bool(_finished_trials(sweep_dir)))
    before = _finished_trials(sweep_dir)

    result = run_cli(*command)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    assert "resuming sweep" in result.stdout
    after = _finished_trials(sweep_dir)
    assert all(after.get(trial) == hashes for trial, hashes in before.items())  # finished trials were not retrained

    client, runs = mlflow_runs(tmp_path / "runs" / "sweep")
    sweeps = [r for r in runs if r.data.tags.get("procl.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    sweep_run = sweeps[0]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    trial_ids = [r.data.tags["tune.trial_id"] for r in trials]
    assert len(trials) == 3 and len(set(trial_ids)) == 3  # one chain run per trial, also for trials the kill interrupted
    for trial in trials:
        assert "strategy.procl.tau" in trial.data.params and "cl/average_accuracy" in trial.data.metrics
        tasks = sorted(r.data.tags["task_index"] for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id)
        # a trial that ran both tasks finished its chain; one ASHA stopped after task 1 ends KILLED
        assert (tasks, trial.info.status) in ((["0", "1"], "FINISHED"), (["0"], "KILLED")), (tasks, trial.info.status)
    assert "sweep/best_objective" in sweep_run.data.metrics and sweep_run.data.metrics["sweep/trials"] == 3

    # the best config is the user's config with the best values, runnable as is (whole stream, own name)
    best_file = sweep_dir / "best_config.yaml"
    best = load_config(best_file)
    best_trial = next(r for r in trials if r.data.tags["tune.trial_id"] == sweep_run.data.tags["best_trial_id"])
    assert best.strategy.procl.tau == pytest.approx(float(best_trial.data.params["strategy.procl.tau"]))
    assert best.run_name == "s1-best" and best.stream.max_tasks is None
    capsys.readouterr()
    assert main(["plan", str(best_file)]) == 0
    assert [t["task"] for t in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tasks"]] == ["amazon", "bbc", "yahoo"]
