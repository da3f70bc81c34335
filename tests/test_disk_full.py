"""The run's storage fills up mid-chain (a small tmpfs as output_dir, filled once task 1 is done and task 2
is training).

The chain must stop with one clear `error:` line, record nothing half-written as done, and, once space
is freed, the same command finishes the chain without retraining the task finished before the disk filled.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_chain import ROOT, mlflow_runs, run_cli, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MiB tmpfs at tmp_path/disk (mounting needs root; skipped where that is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros into disk/filler until the file system has no space left."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    chunk = b"\0" * (1 << 20)
    try:
        while True:
            os.write(descriptor, chunk)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(descriptor)
    return filler


def task_logged(manifest_path: Path, index: int) -> bool:
    try:
        tasks = json.loads(manifest_path.read_text())["tasks"]
    except (OSError, json.JSONDecodeError, KeyError):
        return False
    return len(tasks) > index and tasks[index]["mlflow_run_id"] is not None


def test_a_full_disk_stops_the_chain_cleanly_and_the_chain_resumes_once_space_is_freed(small_disk, tmp_path):
    config = write_config(tmp_path, "full")
    # 48 steps per task: task 2 trains for several seconds, so its end comes after the disk is full (the
    # worker group goes on to task 2 while the driver still logs task 1). No restarts of the worker group:
    # each would fail alike on the full disk (restarts are test_worker_failure.py's), ~25 s each here.
    args = ["run", str(config), "--set", f"output_dir={small_disk / 'runs'}", "--set", "stream.max_tasks=2",
            "--set", "training.epochs=6", "--set", "training.batch_size=1", "--set", "scaling.max_failures=0"]
    run_dir = small_disk / "runs" / "full"
    log = tmp_path / "driver.log"  # not on the small disk
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  env=os.environ | {"HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 600
        while not (task_logged(run_dir / "manifest.json", 0) and "[task 2/2 bbc] step " in log.read_text()):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "task 1 never finished, or task 2 never started training"
            time.sleep(0.2)
        filler = fill(small_disk)
        driver.wait(timeout=900)
    output = log.read_text()
    assert driver.returncode == 1, output[-5000:]  # a runtime failure, not bad input
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "No space left on device" in error_lines[0], output[-5000:]
    assert "in run_chain" not in output  # no traceback from the driver (the workers' ones are Ray's log)

    # nothing of task 2 is recorded or presented as finished
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["amazon"]
    assert not (run_dir / "checkpoints" / "task_1").exists()
    assert manifest["adapter_dir"] is None
    first = manifest["tasks"][0]

    filler.unlink()
    result = run_cli(*args)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    assert "task 1/2 amazon: finished earlier, skipped" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["amazon", "bbc"]
    assert manifest["tasks"][0]["tensors_sha256"] == first["tensors_sha256"]  # not retrained
    _, runs = mlflow_runs(run_dir)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["task_name"] for r in children) == ["amazon", "bbc"]
