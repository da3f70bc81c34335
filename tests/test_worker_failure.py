"""A training worker killed mid-task: Ray Train restarts the worker group from the task's last in-task
checkpoint (FailureConfig + `ray.train.get_checkpoint`) and the chain finishes with nothing lost or doubled.
A driver killed mid-task: the re-submitted chain skips the finished task and resumes the killed one.

The helpers here also serve the node-loss test in test_multinode.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_chain import ROOT, mlflow_runs, write_config

from pipeline.config import ChainConfig, load_config

pytestmark = pytest.mark.integration

TRAIN_EXAMPLES = 64  # 8 optimizer steps per task with 2 workers x batch 4: room to strike between checkpoints


def long_task_config(tmp_path: Path, run_name: str, overrides: list[str] = ()) -> tuple[list[str], ChainConfig]:
    """CLI arguments and config of the chain tests' chain with 2 tasks of 8 steps, a checkpoint after every step."""
    path = write_config(tmp_path, run_name)
    stream = yaml.safe_load((tmp_path / "stream.yaml").read_text())
    for task in stream["tasks"]:
        task["sizes"]["train"] = TRAIN_EXAMPLES
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(stream))
    settings = ["training.checkpoint_every=1", "stream.max_tasks=2", *overrides]
    return ["run", str(path), *(arg for setting in settings for arg in ("--set", setting))], load_config(path, settings)


def registered_mid_task_checkpoint(config: ChainConfig, task_index: int) -> bool:
    """Ray Train's controller has registered an in-task checkpoint of this task: a restart would get it.
    (A folder on disk is not enough: a worker killed before the controller polled it leaves an orphan.)"""
    snapshot = config.run_folder().local_path / "ray" / "chain" / "checkpoint_manager_snapshot.json"  # the chain's one Ray Train run
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError):
        return False  # not written yet, or being replaced right now
    return bool(latest) and latest["metrics"]["task_index"] == task_index and "task_done" not in latest["metrics"]


def run_chain_with_fault(cli_args: list[str], config: ChainConfig, strike: Callable[[], bool], timeout: float = 600) -> None:
    """`python -m pipeline *cli_args` in its own process (a fresh Ray per chain), while this process calls
    `strike()` every 0.2 s, once task 0 has a registered in-task checkpoint, until it returns True.
    Fails if the chain fails or the fault never happened."""
    log = config.run_folder().local_path.parent / f"{config.run_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        chain = subprocess.Popen([sys.executable, "-m", "pipeline", *cli_args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 env=os.environ | {"HF_HUB_OFFLINE": "1"}, start_new_session=True)
        struck, deadline = False, time.monotonic() + timeout
        try:
            while chain.poll() is None and time.monotonic() < deadline:
                if not struck and registered_mid_task_checkpoint(config, 0):
                    struck = strike()
                time.sleep(0.2)
        finally:
            if chain.poll() is None:
                os.killpg(chain.pid, signal.SIGKILL)
            chain.wait()
    assert chain.returncode == 0, log.read_text()[-5000:]
    assert struck, "the fault never happened: the test did not exercise a failure"


def assert_resumed_and_complete(config: ChainConfig) -> None:
    """Task 0 resumed from an in-task checkpoint; both tasks have every step once; one MLflow run per task."""
    manifest = json.loads((config.run_folder().local_path / "manifest.json").read_text())
    resumed_at = manifest["tasks"][0]["resumed_at"]
    assert resumed_at and all(step >= 1 for step in resumed_at), resumed_at
    assert [t["name"] for t in manifest["tasks"]] == ["amazon", "bbc"] and manifest["adapter_dir"]
    steps = TRAIN_EXAMPLES // (config.training.batch_size * config.scaling.num_workers)
    # the resumed worker kept the losses up to its checkpoint and trained the rest: every step once
    assert all(len(record["losses"]) == steps for record in manifest["tasks"])
    assert all(0.0 <= s <= 1.0 for s in manifest["tasks"][-1]["test"].values())
    _, runs = mlflow_runs(config.run_folder().local_path)
    tasks = [r for r in runs if "task_index" in r.data.tags]
    assert sorted(r.data.tags["task_index"] for r in tasks) == ["0", "1"]  # no duplicate or dangling task runs
    assert all(r.info.status == "FINISHED" for r in runs)


def _training_workers() -> list[int]:
    """Pids of live Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in process.info["cmdline"] or ()):
            pids.append(process.info["pid"])
    return pids


def test_a_killed_training_worker_resumes_from_the_last_checkpoint(tmp_path):
    cli_args, config = long_task_config(tmp_path, "worker-kill")

    def kill_a_worker() -> bool:
        workers = _training_workers()
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
        return bool(workers)

    run_chain_with_fault(cli_args, config, kill_a_worker)
    assert_resumed_and_complete(config)


def test_a_resubmitted_chain_skips_what_a_killed_driver_finished_resumes_its_task_and_ends_like_an_uninterrupted_chain(tmp_path):
    from test_chain import kill_driver_when, run_cli

    cli_args, config = long_task_config(tmp_path, "driver-kill")
    manifest_path = config.run_folder().local_path / "manifest.json"

    def task_1_recorded_and_task_2_checkpointed() -> bool:
        try:
            recorded = json.loads(manifest_path.read_text())["tasks"]
        except (OSError, json.JSONDecodeError):
            return False
        return len(recorded) == 1 and registered_mid_task_checkpoint(config, 1)

    # SIGKILL the driver and its local Ray once task 1 is recorded and task 2 has a registered in-task checkpoint
    kill_driver_when(cli_args, task_1_recorded_and_task_2_checkpointed)
    recorded = json.loads(manifest_path.read_text())
    first_task = recorded["tasks"][0]
    # the kill may land before or after task 1 reached MLflow; make it "before" every time: the resumed chain
    # must then log the task, reusing its nested run if the killed driver had already opened one
    first_task["mlflow_run_id"] = None
    manifest_path.write_text(json.dumps(recorded))

    resumed = run_cli(*cli_args)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "task 1/2 amazon: finished earlier, skipped" in resumed.stdout
    # the killed driver's lock died with it; its owner file is what it left, and the takeover is said
    assert "took over" in resumed.stderr and "from a driver that is no longer running" in resumed.stderr
    # task 1 was not retrained; task 2 continued from its checkpoint (Ray Train resumes a run of the same
    # name and storage path), not from its start
    manifest = json.loads(manifest_path.read_text())
    assert manifest["tasks"][0]["tensors_sha256"] == first_task["tensors_sha256"]
    assert manifest["tasks"][1]["resumed_at"], "task 2 restarted from its start"
    _, runs = mlflow_runs(config.run_folder().local_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["task_index"] for r in children) == ["0", "1"]  # no duplicates

    reference_args, reference = long_task_config(tmp_path, "uninterrupted")
    assert run_cli(*reference_args).returncode == 0
    expected = json.loads((reference.run_folder().local_path / "manifest.json").read_text())
    # The same data order and seeds, and the checkpoint holds the weights, the strategy state and every
    # rank's AdamW moments: the resumed chain trains exactly as the uninterrupted one (measured: equal losses).
    for got, want in zip(manifest["tasks"], expected["tasks"], strict=True):
        assert got["losses"] == pytest.approx(want["losses"], abs=1e-6)
        assert got["test"] == want["test"]
