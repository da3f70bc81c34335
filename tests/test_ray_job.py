"""`ray job submit` against a head started with `ray start --head`, loopback only, auth mode explicit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from test_chain import write_config

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.integration



@pytest.fixture
def ray_head(tmp_path):
    """A local head bound to 127.0.0.1 with token auth explicitly off (the same setting for clients).

    Started with --block and ended by ending its own processes: `ray stop` would end every Ray on the
    machine, the chains other tests run at the same time included. Its own --temp-dir: the address file
    that `ray start` writes there would otherwise be left in /tmp/ray, naming a cluster that is gone."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=3", "--object-store-memory=200000000", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # the job server answers once the head is up
            assert head.poll() is None, "ray start --head ended"
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=5)
                break
            assert time.monotonic() < deadline, "the head's dashboard did not answer within 180 s"
            time.sleep(1)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(head.pid)
            processes = [root, *root.children(recursive=True)]
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.terminate()
            # after a job, `ray start` itself, the GCS and the raylet sat out 30 s of SIGTERM (measured); this head
            # has nothing to flush, so the rest is killed after 5 s
            for process in psutil.wait_procs(processes, timeout=5)[1]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_chain(ray_head, tmp_path):
    address, env = ray_head
    config = write_config(tmp_path, "job")
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         sys.executable, "-m", "pipeline", "run", str(config), "--set", "ray.address=auto", "--set", "stream.max_tasks=2"],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert submit.returncode == 0, (submit.stdout[-4000:], submit.stderr[-3000:])
    assert "succeeded" in submit.stdout and "chain finished" in submit.stdout
    manifest = json.loads((tmp_path / "runs" / "job" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["amazon", "bbc"] and manifest["adapter_dir"]
