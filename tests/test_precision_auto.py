"""`auto` precision: bf16 only where the hardware computes it natively, fp32 elsewhere, and the attention
kernel that goes with it; explicit settings always win. The CPU's features are faked so that every kind
of machine is checked on whichever one runs the suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import hardware
from pipeline.config import load_config
from pipeline.models import ModelSpec, load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture
def cpu_features(monkeypatch):
    """Pretend the CPU has the given native bf16 features (none: an AVX2-only CPU)."""
    def fake(*features: str) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: "AMX-BF16" in features)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "AVX512-BF16" in features)
        monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset())
    return fake


@pytest.mark.parametrize("features", [("AMX-BF16",), ("AVX512-BF16",), ("AMX-BF16", "AVX512-BF16")])
def test_auto_trains_and_scores_in_bf16_with_eager_attention_on_a_cpu_with_native_bf16(cpu_features, features):
    cpu_features(*features)
    settled = load_config(DEMO).on_device("cpu")
    assert (settled.model.dtype, settled.deepspeed.bf16, settled.evaluation.bf16) == ("bfloat16", True, True)
    assert settled.model.attn_implementation == "eager"
    note = load_config(DEMO).precision_note()
    assert "training bf16" in note and all(feature in note for feature in features), note


def test_auto_stays_in_fp32_with_the_default_attention_on_a_cpu_without_native_bf16(cpu_features):
    cpu_features()
    settled = load_config(DEMO).on_device("cpu")
    assert (settled.model.dtype, settled.deepspeed.bf16, settled.evaluation.bf16) == ("float32", False, False)
    assert settled.model.attn_implementation is None  # the model's default: sdpa
    note = load_config(DEMO).precision_note()
    assert "training fp32" in note and "neither AVX512-BF16 nor AMX" in note, note


def test_the_cpu_flags_count_when_torch_does_not_see_the_feature(cpu_features, monkeypatch):
    cpu_features()
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert hardware.bf16_support("cpu").native and load_config(DEMO).on_device("cpu").deepspeed.bf16 is True


def test_explicit_settings_win_over_auto(cpu_features):
    cpu_features()
    settled = load_config(DEMO, ["deepspeed.bf16=true"]).on_device("cpu")
    # fp32 weights, DeepSpeed bf16, scoring as training, and eager because the CPU computes in bf16
    assert (settled.model.dtype, settled.deepspeed.bf16, settled.evaluation.bf16, settled.model.attn_implementation) == (
        "float32", True, True, "eager")
    cpu_features("AMX-BF16")
    settled = load_config(DEMO, ["model.dtype=float32", "evaluation.bf16=true", "model.attn_implementation=sdpa"]).on_device("cpu")
    assert (settled.model.dtype, settled.deepspeed.bf16, settled.evaluation.bf16, settled.model.attn_implementation) == (
        "float32", False, True, "sdpa")
    assert "as configured" in load_config(DEMO, ["model.dtype=float32"]).precision_note()


def test_a_settled_config_settles_the_same_again(cpu_features):
    cpu_features("AMX-BF16")
    settled = load_config(DEMO).on_device("cpu")
    cpu_features()  # a worker on another machine reading rank 0's settled config keeps it
    assert settled.on_device("cpu") == settled and settled.scores_in_bf16()


def test_cuda_auto_follows_the_device_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    settled = load_config(DEMO, ["scaling.use_gpu=true"]).on_device("cuda")
    assert (settled.model.dtype, settled.deepspeed.bf16, settled.model.attn_implementation) == ("bfloat16", True, None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert load_config(DEMO, ["scaling.use_gpu=true"]).on_device("cuda").model.dtype == "float32"


def test_a_driver_without_the_workers_gpus_says_the_workers_decide(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "settled on each GPU worker" in load_config(DEMO, ["scaling.use_gpu=true"]).precision_note()


def test_a_model_spec_loads_in_the_settled_dtype(cpu_features):
    cpu_features("AVX512-BF16")
    model, _ = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.config._attn_implementation == "eager"
    cpu_features()
    model, _ = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.config._attn_implementation != "eager"


def test_deepspeed_is_configured_only_from_a_settled_config(cpu_features):
    from pipeline.runtime import deepspeed_config

    cpu_features()  # no native bf16
    with pytest.raises(ValueError, match="settled for its device"):
        deepspeed_config(load_config(None))  # deepspeed.bf16 None: "as model.dtype settles"
    assert deepspeed_config(load_config(None).on_device("cpu"))["bf16"] == {"enabled": False}
