"""The chain end to end through real Ray Train + DeepSpeed + Ray Data + MLflow (sqlite), on a tiny model.

2 workers x 1 CPU (all of this machine's cores), 3 small tasks of real text from the bundled
datasets. Checks the accuracy matrix, the MLflow runs and artifacts, the exported adapter in
vanilla peft. (A re-submitted chain after a killed driver: tests/test_worker_failure.py.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def write_config(folder: Path, run_name: str, **overrides) -> Path:
    stream = {
        "name": "tiny",
        "seed": 0,
        "tasks": [
            {"name": name, "source": {"type": "bundled", "dataset": dataset}, "instruction": f"Classify this {name} text.",
             "max_input_chars": 120, "sizes": {"train": 16, "validation": 6, "test": 8}, **extra}
            for name, dataset, extra in (("amazon", "amazon", {}), ("bbc", "bbc", {}), ("yahoo", "yahoo", {"classes": 3}))
        ],
        "orders": {"main": ["amazon", "bbc", "yahoo"]},
    }
    (folder / "stream.yaml").write_text(yaml.safe_dump(stream))
    config = {
        "run_name": run_name,
        "output_dir": str(folder / "runs"),
        "model": {"name": "tiny-llama"},
        "stream": {"path": str(folder / "stream.yaml")},
        "strategy": {"name": "procl", "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "procl": {"num_slots": 2}},
        "training": {"batch_size": 4, "lr": 0.005, "max_length": 96},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "evaluation": {"batch_size": 8},
        "ray": {"num_cpus": 3},  # logical: 2 training workers + 1 CPU of ingest (scaling.ingest_cpus)
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    path = folder / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, timeout: int = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} | (env or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def mlflow_runs(run_dir: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")  # one store per output_dir
    experiment = client.get_experiment_by_name("procl")
    return client, client.search_runs([experiment.experiment_id])


# ZeRO-2 only: ZeRO 0-3 with the pipeline's own DeepSpeed config, state and export are tests/test_zero_compat.py's
# (in seconds, without a Ray chain's ~90 s of start-up on a slow CPU); the Ray path is the same for every stage
@pytest.mark.parametrize("zero_stage", [2])
def test_chain_runs_end_to_end_and_logs_everything(zero_stage, tmp_path):
    # packed micro-batches (tests/test_packing.py: they train as padded ones) through the real ingest path
    config = write_config(tmp_path, f"chain-z{zero_stage}", deepspeed__zero_stage=zero_stage, training__packing=True)
    # the address file of a `ray start` that was killed: Ray's State API tries that dead cluster for 40 s a call
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    try:
        result = run_cli("run", str(config), "--set", "evaluation.max_new_tokens=12", env={"RAY_TMPDIR": str(ray_tmp)})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    run_dir = tmp_path / "runs" / f"chain-z{zero_stage}"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["amazon", "bbc", "yahoo"]

    # the accuracy matrix: zero-shot row + one row per task, scores for tasks seen so far
    assert set(manifest["zero_shot"]["test"]) == {"amazon", "bbc", "yahoo"}
    for index, record in enumerate(manifest["tasks"]):
        assert list(record["test"]) == ["amazon", "bbc", "yahoo"][: index + 1]
        assert all(0.0 <= score <= 1.0 for score in record["test"].values())
        # a loss per optimizer step (16 examples in batches of 4 on each of 2 workers: 2 steps), averaged over the ranks
        assert len(record["losses"]) == 2 and all(math.isfinite(x) for x in record["losses"]) and record["train_examples"] == 16
        assert 0 < record["seconds"]["train"] and 0 < record["seconds"]["evaluate"]
        assert record["seconds"]["train"] + record["seconds"]["evaluate"] <= record["seconds"]["task"]
        memory = record["memory"]
        assert memory["model_copy_mib"] > 0 and memory["peak_mib"] >= memory["before_models_mib"] > 0
    assert manifest["zero_shot_seconds"] > 0
    # one model per worker for the whole chain: each of the 2 ranks loaded the base model once, not per task nor to score
    loads = [line for line in (result.stdout + result.stderr).splitlines() if "model tiny-llama loaded on cpu" in line]
    assert len(loads) == 2, loads

    client, runs = mlflow_runs(run_dir)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    # each task run spans its task (the driver's task seconds), not the moment it was logged
    durations = {r.data.tags["task_index"]: (r.info.end_time - r.info.start_time) / 1000 for r in children}
    assert durations == {str(i): pytest.approx(record["seconds"]["task"], abs=0.002) for i, record in enumerate(manifest["tasks"])}
    for child in children:
        assert child.data.params["train_examples"] == "16" and child.data.params["optimizer_steps"] == "2"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [0, 1]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    # the runs list's Source and Dataset columns: MLflow's source and git tags, each task's splits as datasets
    assert parent.data.tags["mlflow.source.name"] == "python -m pipeline" and parent.data.tags["mlflow.user"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert parent.data.tags.get("mlflow.source.git.commit") == (head.stdout.strip() if head.returncode == 0 else None)
    chain_inputs = {(i.dataset.name, i.tags[0].value): i.dataset for i in parent.inputs.dataset_inputs}
    assert set(chain_inputs) == {(task, role) for task in ("amazon", "bbc", "yahoo") for role in ("training", "validation", "testing")}
    assert json.loads(chain_inputs[("bbc", "training")].profile)["num_rows"] == 16
    assert all({i.dataset.name for i in child.inputs.dataset_inputs} == {child.data.tags["task_name"]} for child in children)
    # every metric name is grouped under a prefix (docs/METRICS.md)
    assert {name.split("/")[0] for name in parent.data.metrics} == {"cl", "test", "validation", "seconds", "memory"}
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "cl/average_accuracy")] == [0, 1, 2]
    assert 0 < parent.data.metrics["seconds/evaluation_share"] < 1
    evaluate_seconds = client.get_metric_history(parent.info.run_id, "seconds/evaluate")
    assert [m.step for m in evaluate_seconds] == [0, 1, 2] and all(m.value > 0 for m in evaluate_seconds)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"tables", "images", "tasks", "config", "checkpoints", "adapter"} <= artifacts
    # the config that ran, --set value included; the figures as image history, a step per task; the matrix table
    resolved = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "config/resolved.yaml", str(tmp_path))).read_text())
    assert resolved["evaluation"]["max_new_tokens"] == 12 and resolved["training"]["lr"] == 0.005
    images = [a.path for a in client.list_artifacts(parent.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(path.split("+")[2]) for path in images if "/accuracy_matrix+" in path) == [0, 1, 2]
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "tables/accuracy_matrix.json", str(tmp_path))).read_text())
    assert table["columns"] == ["after", "amazon", "bbc", "yahoo"] and len(table["data"]) == 4

    # `procl report` reads the chain back from the store: its stream, order, strategy and both matrices
    report = run_cli("report", str(tmp_path / "runs"), "--json")
    assert report.returncode == 0, report.stderr[-3000:]
    (chain,) = json.loads(report.stdout)["chains"]
    assert (chain["stream"], chain["order"], chain["label"], chain["seed"]) == ("tiny", "main", "procl", "0")
    rows = [manifest["zero_shot"]["test"]] + [record["test"] for record in manifest["tasks"]]
    assert chain["test"] == [[row.get(name) for name in ("amazon", "bbc", "yahoo")] for row in rows]  # k/8: exact
    # MLflow's tables keep 10 digits
    assert chain["validation"][-1] == pytest.approx([manifest["tasks"][-1]["validation"][name] for name in ("amazon", "bbc", "yahoo")])

    # the exported adapter is a plain peft LoRA that vanilla peft loads and merges
    from peft import PeftModel

    from pipeline.models import ModelSpec, load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    merged = PeftModel.from_pretrained(base, manifest["adapter_dir"]).merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert "chain finished" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout
    # Ray Train's placement-group cleaner cannot reach the State API without a dashboard: quieted, not spammed,
    # and it fails at once rather than on the stale cluster (the fit's end then waited 12 s for it, and said so)
    assert "State API may be temporarily unavailable" not in result.stdout + result.stderr
    assert "PlacementGroupCleaner" not in result.stdout + result.stderr
    # Ray's routine lines (one per report of every rank, one per dataset) are filtered without --verbose
    assert "Reporting training result" not in result.stdout + result.stderr
    assert "execution finished in" not in result.stdout + result.stderr
    # the workers' progress lines reach the console, each once (print() inside Ray Train doubled them)
    progress = [line for line in (result.stdout + result.stderr).splitlines() if "] step " in line]
    assert progress and len(progress) == len(set(progress)), progress


def kill_driver_when(args: list[str], ready: Callable[[], bool], timeout: float = 600) -> None:
    """Run `python -m pipeline *args` and SIGKILL its process group (driver + the local Ray it started)
    as soon as `ready()` is true; fails if the driver ends first or `ready()` never comes."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert driver.poll() is None, "the driver ended before the moment to kill it"
            if time.monotonic() > deadline:
                pytest.fail(f"the moment to kill the driver did not come within {timeout} s")
            time.sleep(1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if the driver ended on its own
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()


def test_a_run_folder_of_another_chain_is_refused(tmp_path):
    config = write_config(tmp_path, "other")
    run_dir = tmp_path / "runs" / "other"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"fingerprint": "0" * 16, "task_names": ["amazon", "bbc", "yahoo"], "tasks": []}))
    result = run_cli("run", str(config), timeout=300)
    assert result.returncode == 2
    assert "holds a chain with different settings" in result.stderr


def test_the_reference_mlp_variant_of_a_model_folder_runs_quietly_unmerged_within_a_step_budget_without_an_adapter_export(tmp_path):
    """ProCL's reference-fidelity variant keeps an MLP at inference: scored unmerged, not exported as LoRA. With a
    step budget, and the model read from a folder, as a user's own model is (transformers' loading bars stay quiet)."""
    from pipeline.models import ModelSpec, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = write_config(tmp_path, "reference-mlp")
    # the step budget: 1 of the 2 steps each task's data gives
    result = run_cli("run", str(config), "--set", "stream.max_tasks=2", "--set", "strategy.procl.formulation=reference",
                     "--set", "strategy.procl.reference_mlp=true", "--set", "training.max_steps=1",
                     "--set", f"model.name={tmp_path / 'model'}")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    assert "no adapter export: procl.reference_mlp" in result.stdout and "adapter (plain peft LoRA)" not in result.stdout
    assert "Loading weights" not in result.stdout + result.stderr
    manifest = json.loads((tmp_path / "runs" / "reference-mlp" / "manifest.json").read_text())
    assert len(manifest["tasks"]) == 2 and manifest["adapter_dir"] is None
    assert [len(t["losses"]) for t in manifest["tasks"]] == [1, 1]
    assert all(0.0 <= s <= 1.0 for s in manifest["tasks"][-1]["test"].values())


def test_a_task_whose_training_fails_reports_the_tasks_own_error_in_one_line(tmp_path):
    """A task whose workers fail (on every restart Ray Train is allowed) ends the chain with one line naming the
    task and the workers' own error (what the CLI prints after `error:`), not Ray's exception with its tracebacks."""
    config = write_config(tmp_path, "fails")
    # its own process: a Ray started in pytest's process would leave its settings to later tests
    script = f"""
import json
from pathlib import Path
from pipeline import chain
from pipeline.config import load_config

# no restarts: they would fail alike (test_worker_failure.py tests them), ~25 s each
config = load_config(Path({str(config)!r}), ["scaling.max_failures=0"])
tasks = chain.select_tasks(config)
chain.init_ray(config)
try:  # the workers cannot load the previous task's state
    list(chain._worker_group_results(config, tasks, [(0, [list(p) for p in tasks[0].training_texts()])],
                                     Path({str(tmp_path / "no-such-checkpoint")!r}), zero_shot=False, export=False))
except RuntimeError as error:
    print("RESULT", json.dumps([type(error).__name__, str(error)]))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, (result.stdout[-3000:], result.stderr[-3000:])
    kind, message = json.loads(lines[0].removeprefix("RESULT "))
    assert kind == "RuntimeError" and "\n" not in message, message
    assert message.startswith("task amazon: training failed (after 0 restarts): "), message
    assert "no-such-checkpoint" in message
