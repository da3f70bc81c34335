"""The embedded SmolLM2-135M-Instruct, loaded offline, scores a bundled task above chance zero-shot."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.evaluation import answered_correctly
from pipeline.models import ModelSpec, load_model_and_tokenizer
from pipeline.streams import load_stream

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_embedded_model_scores_yahoo_topics_above_chance_zero_shot(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="smollm2-135m"))
    # the topics stream's yahoo task with 100 test questions: 32 left a 10-class accuracy to the luck of the draw
    # (0.41 on one sample, 0.22 on another)
    stream = yaml.safe_load((ROOT / "configs" / "streams" / "topics.yaml").read_text())
    task = next(t for t in stream["tasks"] if t["name"] == "yahoo") | {"sizes": {"train": 48, "validation": 16, "test": 100}}
    (tmp_path / "yahoo.yaml").write_text(yaml.safe_dump({"name": "yahoo", "seed": stream["seed"], "tasks": [task], "orders": {"main": ["yahoo"]}}))
    [yahoo] = load_stream(tmp_path / "yahoo.yaml")
    assert len(yahoo.answers) == 10  # chance is 0.1
    with torch.inference_mode():
        correct = answered_correctly(model, tokenizer, yahoo.prompts("test"), yahoo.targets("test"), "accuracy", yahoo.answers, 16)
        accuracy = sum(correct) / len(correct)
    assert accuracy >= 0.2, accuracy  # twice chance; measured 0.29 (AMD EPYC, 2026-12-04)


def test_scoring_follows_the_training_precision_and_bf16_agrees_with_fp32(monkeypatch):
    """evaluation.bf16 defaults to deepspeed.bf16; bf16 scoring really runs in bf16 and scores like fp32."""
    from pipeline.scoring import score_tasks
    from pipeline.config import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # float32 weights, as "auto" loads them on a CPU without native bf16 (on one with it, "auto" is bf16 throughout)
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="smollm2-135m", dtype="float32"))
    (full,) = [t for t in load_stream(ROOT / "configs" / "streams" / "topics.yaml", "order1") if t.name == "yahoo"]
    # 8 questions per split: bf16 is emulated, several times slower, on a CPU without AVX512-BF16 / AMX
    yahoo = [dataclasses.replace(full, splits={split: full.splits[split][:8] for split in ("validation", "test")})]
    seen_dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen_dtypes.append(output.dtype))
    scores = {}
    for bf16, overrides in ((True, ["deepspeed.bf16=true"]), (False, ["deepspeed.bf16=true", "evaluation.bf16=false"])):
        config = load_config(None, overrides)
        assert config.scores_in_bf16() is bf16
        seen_dtypes.clear()
        scores[bf16] = score_tasks(model, tokenizer, yahoo, config)
        assert set(seen_dtypes) == {torch.bfloat16 if bf16 else torch.float32}
    assert load_config(None, ["model.dtype=float32"]).scores_in_bf16() is False  # fp32 training scores in fp32
    for split in ("validation", "test"):  # benchmarks/eval_precision.py: 47 of 48 answers equal (a trained adapter)
        assert abs(scores[True][split]["yahoo"] - scores[False][split]["yahoo"]) <= 1 / 8 + 1e-9
