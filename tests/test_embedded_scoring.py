"""The embedded SmolLM2-135M-Instruct, loaded offline, scores a bundled task above chance zero-shot."""

from pathlib import Path

import pytest
import torch

from pipeline.evaluation import score_task
from pipeline.models import ModelSpec, load_model_and_tokenizer
from pipeline.streams import load_stream

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_embedded_model_scores_yahoo_topics_above_chance_zero_shot(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="smollm2-135m"))
    yahoo = next(t for t in load_stream(ROOT / "configs" / "streams" / "demo.yaml", "order1") if t.name == "yahoo")
    assert len(yahoo.answers) == 10  # chance is 0.1
    with torch.inference_mode():
        accuracy = score_task(model, tokenizer, yahoo.prompts("test"), yahoo.targets("test"), "accuracy", yahoo.answers, 16)
    assert accuracy >= 0.25, accuracy  # measured 0.41 on the 32 demo test questions
