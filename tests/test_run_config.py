"""Run configs: defaults, --set overrides, and bad configs rejected before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main, plan
from pipeline.config import ConfigError, load_config
from pipeline.hardware import bf16_support

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_config_validates_and_overrides_apply():
    config = load_config(ROOT / "configs" / "demo.yaml", ["strategy.name=seq_lora", "training.lr=1e-3", "strategy.lora.target_modules=[q_proj]"])
    assert config.strategy.name == "seq_lora" and config.training.lr == 1e-3
    assert config.strategy.lora.target_modules == ["q_proj"]
    assert config.model.name == "smollm2-135m"


def test_only_the_reference_mlp_variant_is_not_a_plain_lora():
    assert load_config(None, []).exports_plain_lora()
    assert load_config(None, ["strategy.procl.formulation=reference"]).exports_plain_lora()
    assert not load_config(None, ["strategy.procl.formulation=reference", "strategy.procl.reference_mlp=true"]).exports_plain_lora()
    assert load_config(None, ["strategy.name=seq_lora"]).exports_plain_lora()


def test_fingerprint_ignores_where_it_runs_but_not_what_it_trains():
    base = load_config(ROOT / "configs" / "demo.yaml")
    assert base.fingerprint() == load_config(ROOT / "configs" / "demo.yaml", ["scaling.num_workers=4"]).fingerprint()
    assert base.fingerprint() != load_config(ROOT / "configs" / "demo.yaml", ["training.lr=0.1"]).fingerprint()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["colour=red"], r"colour: Extra inputs are not permitted"),
        (["training.lr=fast"], r"training.lr: Input should be a valid number"),
        (["training.lr=-1"], r"training.lr: Input should be greater than 0"),
        (["strategy.name=ewc"], r"unknown strategy 'ewc'; choose one of"),
        (["strategy.lora.r=6"], r"num_slots=4 does not divide strategy.lora.r \(6\)"),
        (["strategy.procl.tau=0"], r"strategy.procl.tau: Input should be greater than 0"),
        (["deepspeed.zero_stage=4"], r"deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], r"offload_optimizer needs deepspeed.zero_stage >= 1"),
        (["model.dtype=float8"], r"model.dtype"),
        (["run_name=a/b"], r"run_name: String should match pattern"),
        (["training.lr"], r"--set 'training.lr': expected key.path=value"),
    ],
)
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "demo.yaml", overrides)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: expected a mapping of sections"):
        load_config(bad)


def test_plan_reports_tasks_sizes_steps_and_time_without_training():
    summary = plan(load_config(ROOT / "configs" / "demo.yaml"))
    assert [row["task"] for row in summary["tasks"]] == ["banking", "hwu", "stackoverflow"]
    assert all(row["sizes"] == {"train": 192, "validation": 16, "test": 32} for row in summary["tasks"])
    assert all(row["steps"] == 192 // (4 * 2) for row in summary["tasks"])
    assert summary["workers"] == 2 and summary["estimated_minutes_cpu"] > 0
    assert summary["answer_words"] == "checked: every answer word of every task tokenizes"


def test_plan_accepts_the_gpu_cluster_config_without_downloading_the_model():
    """configs/gpu.yaml names a hub model that is not here: the dry run says the answer words wait for `run`, and
    tries no download (the hub is out of reach here: a download attempt would fail the plan)."""
    config = load_config(ROOT / "configs" / "gpu.yaml")
    summary = plan(config)
    assert summary["model"] == "Qwen/Qwen2.5-7B-Instruct" and summary["zero_stage"] == 3 and summary["workers"] == 8
    assert summary["resources_per_worker"] == {"CPU": 4, "GPU": 1}
    assert summary["chain_cpus"] == 8 * 4 + 4  # workers x cpus_per_worker + ingest_cpus: checked by `run` on the cluster
    assert summary["answer_words"].startswith("not checked: Qwen/Qwen2.5-7B-Instruct is not in the local Hugging Face cache")
    assert "settled on each GPU worker" in summary["precision"]
    assert config.training.gradient_checkpointing and config.training.lr_scheduler == "cosine" and config.training.max_steps


def test_cli_rejects_a_bad_config_before_starting_ray(capsys):
    import ray

    ray.shutdown()  # the Ray an earlier test's `plan` started in this process (it samples the tasks on Ray Data)
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--set", "strategy.procl.ema_lambda=2"]) == 2
    assert "strategy.procl.ema_lambda: Input should be less than or equal to 1" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_python_m_pipeline_plan_and_help_work_from_a_shell(capsys):
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", "configs/demo.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["strategy"] == "procl"
    # the precision auto chose on this machine, and why, as a line of its own
    expected = "training bf16" if bf16_support("cpu").native else "training fp32"
    assert summary["precision"].startswith("precision: ") and expected in summary["precision"]
    assert summary["precision"] in out.stdout.splitlines()
    # the commands' help, in this process: `python -m pipeline` itself ran above (each process imports torch, ~10 s)
    for command in ("run", "plan", "eval", "export"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and "--set" in capsys.readouterr().out


def test_bad_stream_data_fails_before_anything_is_written(tmp_path, capsys):
    code = main(["run", str(ROOT / "configs" / "demo.yaml"), "--set", f"output_dir={tmp_path}", "--set", f"stream.path={tmp_path / 'missing.yaml'}"])
    assert code == 2
    assert "missing.yaml: file not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store


@pytest.mark.parametrize(("error", "code"), [(RuntimeError("task bbc: training failed"), 1), (OSError(28, "No space left on device"), 1),
                                             (ConfigError("c.yaml: training.lr: bad"), 2)])
def test_runtime_failures_exit_1_input_errors_2_and_debug_shows_the_traceback(monkeypatch, capsys, error, code):
    import pipeline.cli as cli

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_command", fail)
    assert main(["plan", str(ROOT / "configs" / "demo.yaml")]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {error}"]  # one line, no traceback
    assert main(["plan", str(ROOT / "configs" / "demo.yaml"), "--debug"]) == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith(f"error: {error}")


def test_a_cluster_without_cpus_for_the_workers_and_their_ingest_is_refused_before_anything_starts():
    from pipeline.chain import check_cluster_cpus

    config = load_config(ROOT / "configs" / "demo.yaml")  # 2 workers x 1 CPU + ingest_cpus 1
    check_cluster_cpus(config, 3.0)
    with pytest.raises(ConfigError, match=r"the chain needs 3 CPUs \(2 workers x cpus_per_worker 1 \+ ingest_cpus 1\), the Ray cluster has 2"):
        check_cluster_cpus(config, 2.0)  # the ingest would wait for a CPU the training workers hold: a hang
