"""Run folders in object storage: a local S3 endpoint (moto's standalone server on 127.0.0.1, started and stopped
here) holds the manifest, the checkpoints, Ray Train's storage, the owner's lease and the exported adapter.

Unit tests drive `pipeline.storage.RunFolder`, the manifest and the lease against it; one integration test runs a
2-task chain there through Ray Train + DeepSpeed, kills its driver after the first task, resumes it with the same
command, and loads the exported adapter in vanilla peft after a download.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request

import pyarrow.fs as pafs
import pytest
import torch
from conftest import free_port

from pipeline.config import ConfigError, load_config
from pipeline.manifest import Manifest, ManifestError, TaskRecord
from pipeline.run_lock import OWNER_FILE, RunFolderInUse, RunFolderLock
from pipeline.storage import COMPLETE_MARKER, RunFolder
from procl.checkpoint import TENSORS_FILE, write_state

BUCKET = "procl-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port with one bucket; AWS_ENDPOINT_URL and test credentials in this
    process's environment (and so in every driver, Ray worker and Ray Train controller it starts) while it runs."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV | {"AWS_ENDPOINT_URL": endpoint})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
                time.sleep(0.2)
        filesystem, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")  # endpoint: from the environment
        filesystem.create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_file_is_replaced_whole_and_a_folder_is_read_only_once_its_publish_is_complete(s3, tmp_path):
    folder = RunFolder.at(f"{s3}/unit") / "run"
    assert str(folder) == f"{s3}/unit/run" and str(RunFolder.at(str(folder))) == str(folder)
    (folder / "manifest.json").write_text('{"a": 1}')
    (folder / "manifest.json").write_text('{"a": 2}')
    assert json.loads((folder / "manifest.json").read_text()) == {"a": 2}

    source = tmp_path / "state"
    (source / "sub").mkdir(parents=True)
    (source / "tensors.bin").write_bytes(b"x" * 10)
    (source / "sub" / "meta.json").write_text("{}")
    state = folder / "checkpoints" / "task_0"
    state.publish(source)
    assert state.is_complete() and (state / COMPLETE_MARKER).is_file()
    with state.local_copy() as local:
        assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*")) == ["sub", "sub/meta.json", "tensors.bin"]

    # a publish over an older folder leaves none of its files behind
    (source / "tensors.bin").unlink()
    (source / "other.bin").write_bytes(b"y")
    state.publish(source)
    with state.local_copy() as local:
        assert not (local / "tensors.bin").exists() and (local / "other.bin").read_bytes() == b"y"

    # a publish that died before its marker (files up, no marker) is never read as a folder
    (state / COMPLETE_MARKER).delete()
    assert not state.is_complete()
    with pytest.raises(FileNotFoundError, match="not a complete folder"), state.local_copy():
        pass


def test_a_manifest_in_object_storage_verifies_its_checkpoints(s3, tmp_path):
    run = RunFolder.at(f"{s3}/manifest") / "run"
    local_state = write_state(tmp_path / "state", {"w": torch.ones(3)}, {"strategy": "seq_lora"})
    state = run / "checkpoints" / "task_0"
    state.publish(local_state)
    manifest = Manifest("f", ["t0", "t1"])
    manifest.record(TaskRecord(0, "t0", str(state), (state / TENSORS_FILE).sha256(), {"t0": 0.5}, {"t0": 0.5}, [1.0]))
    manifest.save(run)
    reopened = Manifest.open(run, "f", ["t0", "t1"])
    assert reopened.is_done(0) and str(reopened.last_state()) == str(state)

    (state / TENSORS_FILE).write_text("altered")
    with pytest.raises(ManifestError, match="does not match its recorded sha256"):
        Manifest.open(run, "f", ["t0", "t1"])


def test_a_lease_refuses_a_live_driver_and_is_taken_over_from_a_dead_one(s3, caplog, monkeypatch):
    monkeypatch.setattr("pipeline.run_lock.SETTLE_SECONDS", 0.0)
    run = RunFolder.at(f"{s3}/lease") / "run"
    with RunFolderLock(run):
        owner = json.loads((run / OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(RunFolderInUse, match=f"in use by another driver \\(pid {os.getpid()}"):
            RunFolderLock(run).__enter__()
    assert not (run / OWNER_FILE).exists()  # released

    # a driver on this host that is gone (its pid ended) left its lease: taken over at once, and said so
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "since": "then", "command": "x",
                                              "token": "old", "renewed": time.time()}))
    with caplog.at_level(logging.WARNING, logger="pipeline.run_lock"), RunFolderLock(run):
        assert json.loads((run / OWNER_FILE).read_text())["pid"] == os.getpid()
    assert "from a driver that is no longer running" in caplog.text

    # a lease from another host is live until it lapses unrenewed
    other = {"host": "elsewhere", "pid": 1, "since": "then", "command": "x", "token": "other"}
    (run / OWNER_FILE).write_text(json.dumps(other | {"renewed": time.time()}))
    with pytest.raises(RunFolderInUse, match="on host elsewhere"):
        RunFolderLock(run).__enter__()
    (run / OWNER_FILE).write_text(json.dumps(other | {"renewed": time.time() - 3600}))
    with RunFolderLock(run):
        pass


def test_the_lease_is_renewed_while_the_driver_runs(s3, monkeypatch):
    monkeypatch.setattr("pipeline.run_lock.SETTLE_SECONDS", 0.0)
    monkeypatch.setattr("pipeline.run_lock.LEASE_SECONDS", 0.8)
    run = RunFolderLock(RunFolder.at(f"{s3}/renew") / "run")
    with run:
        first = json.loads((run.run_folder / OWNER_FILE).read_text())["renewed"]
        time.sleep(1.0)
        assert json.loads((run.run_folder / OWNER_FILE).read_text())["renewed"] > first
        # another driver took the folder over (this one was not heard from for a lease): it is not taken back
        other = {"host": "elsewhere", "pid": 1, "since": "now", "command": "x", "token": "other", "renewed": time.time()}
        (run.run_folder / OWNER_FILE).write_text(json.dumps(other))
        time.sleep(0.5)
        assert json.loads((run.run_folder / OWNER_FILE).read_text())["token"] == "other"
    assert json.loads((run.run_folder / OWNER_FILE).read_text())["token"] == "other"  # nor removed on exit


def test_an_output_dir_in_object_storage_needs_a_tracking_uri(tmp_path):
    with pytest.raises(ConfigError, match="tracking.uri: output_dir s3://bucket/runs is object storage"):
        load_config(None, ["output_dir=s3://bucket/runs"])
    config = load_config(None, ["output_dir=s3://bucket/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert config.output_dir == "s3://bucket/runs"


@pytest.mark.integration
def test_a_chain_in_object_storage_resumes_after_a_killed_driver_and_exports_an_adapter_vanilla_peft_loads(s3, tmp_path):
    from peft import PeftModel
    from test_chain import kill_driver_when, run_cli, write_config

    from pipeline.models import ModelSpec, load_model_and_tokenizer

    output_dir = f"{s3}/runs"
    config = write_config(tmp_path, "s3-chain")
    args = ["run", str(config), "--set", f"output_dir={output_dir}", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "--set", "stream.max_tasks=2"]
    run = RunFolder.at(output_dir) / "s3-chain"

    def first_task_recorded() -> bool:
        try:
            return len(json.loads((run / "manifest.json").read_text())["tasks"]) == 1
        except (OSError, ValueError):
            return False

    kill_driver_when(args, first_task_recorded)
    first = json.loads((run / "manifest.json").read_text())["tasks"][0]

    resumed = run_cli(*args)
    assert resumed.returncode == 0, (resumed.stdout[-3000:], resumed.stderr[-5000:])
    assert "task 1/2 amazon: finished earlier, skipped" in resumed.stdout
    assert "took over" in resumed.stderr  # the killed driver's lease, left behind on this host
    manifest = json.loads((run / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["amazon", "bbc"]
    assert manifest["tasks"][0]["tensors_sha256"] == first["tensors_sha256"]  # not trained again
    for task in manifest["tasks"]:
        assert task["state_dir"].startswith(f"{output_dir}/s3-chain/checkpoints/task_") and RunFolder.at(task["state_dir"]).is_complete()
    assert manifest["adapter_dir"] == f"{output_dir}/s3-chain/adapter"
    # Ray Train kept its checkpoints in the bucket, and nothing of the run folder was written on local disk
    assert (run / "ray" / "chain").exists() and not (tmp_path / "runs").exists()
    assert not (run / OWNER_FILE).exists()

    # the adapter, downloaded, in vanilla peft: it changes the base model's output
    local = tmp_path / "adapter"
    local.mkdir()
    pafs.copy_files(RunFolder.at(manifest["adapter_dir"]).path, str(local), source_filesystem=run.filesystem)
    base, tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-llama", dtype="float32"))
    ids = tokenizer("Classify this amazon text.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, str(local)).merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(before, after)

    # `procl export` reads a checkpoint from the bucket and writes a whole adapter there, with the chain's tensors
    exported = f"{output_dir}/exported"
    result = run_cli("export", str(config), "--set", f"output_dir={output_dir}", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                     "--checkpoint", manifest["tasks"][-1]["state_dir"], "--out", exported, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert RunFolder.at(exported).is_complete()
    from safetensors.torch import load_file

    shapes = {}
    for where in (exported, manifest["adapter_dir"]):
        with RunFolder.at(where).local_copy() as folder:
            shapes[where] = {name: tensor.shape for name, tensor in load_file(str(folder / "adapter_model.safetensors")).items()}
    assert shapes[exported] == shapes[manifest["adapter_dir"]]
