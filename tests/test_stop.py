"""A clean stop through the real CLI: SIGINT or SIGTERM to the driver in several phases ends the chain within
30 s with 130 / 143 and no native stack dump, ends the Ray processes it started, marks the MLflow runs KILLED
and leaves a run folder the same command resumes. And one driver per run folder: a second one is refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from test_chain import ROOT, mlflow_runs, run_cli, write_config

pytestmark = pytest.mark.integration
STOP_WITHIN_S = 30


class Driver:
    """`python -m pipeline *args` in its own session, its output in files (read while it runs)."""

    def __init__(self, folder: Path, name: str, *args: str) -> None:
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        env = os.environ | {"HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env,
                                            stdout=out, stderr=err, start_new_session=True)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.process.poll() is None, f"the driver ended before {text!r}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"{text!r} did not come within {timeout} s"
            time.sleep(0.2)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def drivers():
    started: list[Driver] = []
    yield started
    for driver in started:  # whatever a failed test left running
        driver.kill()


def stop(driver: Driver, signum: signal.Signals) -> float:
    """Send `signum` to the driver alone; its exit must end every process it started. Returns the seconds it took."""
    children = psutil.Process(driver.process.pid).children(recursive=True)  # none yet early in Ray's start
    sent = time.monotonic()
    driver.process.send_signal(signum)
    try:
        driver.process.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{signum.name}: the driver still runs after {STOP_WITHIN_S} s:\n{driver.output()[-3000:]}")
    took = time.monotonic() - sent
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {[p.info if hasattr(p, 'info') else p for p in alive]}"
    output = driver.output()
    assert driver.process.returncode == 128 + signum, (driver.process.returncode, output[-3000:])
    assert f"stopped by {signum.name}" in output
    own = "\n".join(line for line in output.splitlines() if "pid=" not in line)  # the driver's lines, not Ray's actors'
    assert "Fatal Python error" not in own and "Stack trace" not in own and "Traceback" not in own, own[-3000:]
    return took


def assert_killed_in_mlflow(run_dir: Path) -> None:
    _, runs = mlflow_runs(run_dir)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED"]
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.parametrize(("signum", "phase", "marker"), [
    (signal.SIGINT, "ray-start", "sampling the tasks of "),
    (signal.SIGTERM, "zero-shot", "zero-shot evaluation on 3 tasks"),
])
def test_a_signal_before_training_stops_the_chain_cleanly(signum, phase, marker, tmp_path, drivers):
    config = write_config(tmp_path, f"stop-{phase}")
    driver = Driver(tmp_path, "driver", "run", str(config))
    drivers.append(driver)
    driver.wait_for(marker)
    stop(driver, signum)
    run_dir = tmp_path / "runs" / f"stop-{phase}"
    if phase == "zero-shot":  # it stopped in that phase: the chain run exists, the zero-shot row does not
        assert json.loads((run_dir / "manifest.json").read_text())["zero_shot"] is None
        assert_killed_in_mlflow(run_dir)
    else:  # before the chain's MLflow run and manifest were written
        assert not (run_dir / "manifest.json").exists()
    assert not (run_dir / "owner.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_training_stops_the_chain_cleanly_and_the_same_command_resumes(signum, tmp_path, drivers):
    config = write_config(tmp_path, f"stop-training-{signum.name}")
    # a first task of 50 steps: the signal lands while it trains
    stream = yaml.safe_load((tmp_path / "stream.yaml").read_text())
    stream["tasks"][0]["sizes"]["train"] = 400
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(stream))
    run_dir = tmp_path / "runs" / f"stop-training-{signum.name}"
    driver = Driver(tmp_path, "driver", "run", str(config))
    drivers.append(driver)
    if signum == signal.SIGINT:
        # one driver per chain: once the first holds the run folder, a second one is refused at once, naming it
        driver.wait_for("precision: ")
        second = run_cli("run", str(config), timeout=120)
        assert second.returncode == 1, (second.stdout[-2000:], second.stderr[-2000:])
        error = second.stderr.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: ") and "is in use by another driver" in error[0], error
        assert f"pid {driver.process.pid} on host" in error[0]
    driver.wait_for("] step ")
    stop(driver, signum)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["tasks"] == []  # stopped while training the first task
    assert_killed_in_mlflow(run_dir)
    assert not (run_dir / "owner.json").exists()  # a clean stop releases the run folder
    if signum == signal.SIGTERM:
        resumed = run_cli("run", str(config))
        assert resumed.returncode == 0, (resumed.stdout[-3000:], resumed.stderr[-5000:])
        assert "took over" not in resumed.stdout + resumed.stderr
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert [t["name"] for t in manifest["tasks"]] == ["amazon", "bbc", "yahoo"]
        _, runs = mlflow_runs(run_dir)
        assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["FINISHED"]


def test_a_stop_during_the_import_of_ray_ends_without_a_second_error(monkeypatch):
    """SIGINT while `import ray` runs leaves a half-initialised module behind (seen in CI: the way out then
    failed with "partially initialized module 'ray'" and exit 1); ending Ray must not import it again."""
    import types

    from pipeline import cli

    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))  # what an interrupted import leaves
    cli._end_ray()
