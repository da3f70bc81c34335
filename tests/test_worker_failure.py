"""A training worker killed mid-task: Ray Train restarts the worker group from the task's last in-task
checkpoint (FailureConfig + `ray.train.get_checkpoint`) and the chain finishes with nothing lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_chain import mlflow_runs, write_config

from pipeline.config import load_config

pytestmark = pytest.mark.integration

TRAIN_EXAMPLES = 64  # 8 optimizer steps per task with 2 workers x batch 4: room to kill between checkpoints


def _training_workers() -> list[int]:
    """Pids of live Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in process.info["cmdline"] or ()):
            pids.append(process.info["pid"])
    return pids


def _checkpoints(task_dir: Path) -> list[Path]:
    """The checkpoint folders Ray Train persisted for a task (next to its checkpoint_manager_snapshot.json)."""
    return [p for p in task_dir.glob("checkpoint_*") if p.is_dir()]


def _kill_a_worker_after_two_checkpoints(task_dir: Path, killed: list[int], seen: set[int], stop: threading.Event) -> None:
    while not stop.is_set():
        workers = _training_workers()
        seen.update(workers)
        # two checkpoints on disk: the first is surely registered with Ray Train by then
        if not killed and workers and task_dir.is_dir() and len(_checkpoints(task_dir)) >= 2:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])
        time.sleep(0.2)


def test_a_killed_training_worker_resumes_from_the_last_checkpoint(tmp_path):
    import ray
    from pipeline.chain import run_chain, select_tasks, steps_per_task

    path = write_config(tmp_path, "worker-kill")
    stream = yaml.safe_load((tmp_path / "stream.yaml").read_text())
    for task in stream["tasks"]:
        task["sizes"]["train"] = TRAIN_EXAMPLES
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(stream))
    config = load_config(path, ["training.checkpoint_every=1", "stream.max_tasks=2"])

    killed: list[int] = []
    seen: set[int] = set()
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_two_checkpoints,
                              args=(config.run_dir() / "ray" / "task_0", killed, seen, stop), daemon=True)
    killer.start()
    try:
        result = run_chain(config, path)
    finally:
        stop.set()
        killer.join()
        ray.shutdown()
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert len(seen) > 2 * 2  # 2 workers per task, plus the replacement(s) for task 0's restarted group

    # the restarted group resumed from an in-task checkpoint, not from the start of the task
    final = max(_checkpoints(config.run_dir() / "ray" / "task_0"), key=lambda p: p.stat().st_mtime)
    resumed_at = json.loads((final / "progress.json").read_text()).get("resumed_at")
    assert resumed_at and all(step >= 1 for step in resumed_at), resumed_at
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["amazon", "bbc"]
    steps = steps_per_task(config, select_tasks(config)[0])
    for record in manifest["tasks"]:
        # the resumed worker kept the losses up to its checkpoint and trained the rest: every step once
        assert len(record["losses"]) == steps
    assert len(result.matrix) == 3 and all(0.0 <= s <= 1.0 for s in manifest["tasks"][-1]["test"].values())
    _, runs = mlflow_runs(result.run_dir)
    tasks = [r for r in runs if "task_index" in r.data.tags]
    assert sorted(r.data.tags["task_index"] for r in tasks) == ["0", "1"]  # no duplicate or dangling task runs
    assert all(r.info.status == "FINISHED" for r in runs)
