"""ZeRO-3 loading of the base model (`pipeline.runtime.load_base_model`): created partitioned over the ranks, so
no rank ever holds it whole, and a chain on it ends as under ZeRO-2.

2 gloo ranks on CPU, a tiny Llama read from a model folder (the `from_pretrained` path a user's model takes),
`stage3_param_persistence_threshold: 0` so that even its small weights are partitioned. Each stage runs the
worker runtime the Ray workers run: the base model loaded once, two ProCL tasks (plain LoRA, then program
memory with consolidation) attached, trained, scored on the same model and detached, then the export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, init_deepspeed_gloo, rank_env
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.streams import Task

STAGES = (2, 3)
TASKS, STEPS = 2, 3


def _task(index: int) -> Task:
    """A small classification task of fixed words (the label words are in the tiny tokenizer's corpus)."""
    words = [("the team won the match", "sports"), ("shares rose after the report", "business"),
             ("a new phone with a faster chip", "technology"), ("the minister announced a policy", "politics")]
    rows = [{"text": f"{text} {index} {n}", "target": label} for n in range(3) for text, label in words]
    return Task(name=f"task{index}", instruction="Classify the text into one of the labels.", metric="accuracy",
                answers=["sports", "business", "technology", "politics"],
                splits={"train": rows, "validation": rows[:4], "test": rows[4:]})


def _run_stage(rank: int, stage: int, model_dir: str, out: Path) -> None:
    import deepspeed

    from pipeline.preprocess import TokenizeBatch, TrimPadding
    from pipeline.runtime import deepspeed_config, load_base_model, lr_schedule, score, train_steps
    from pipeline.scoring import attach_strategy

    config = load_config(None, [
        f"model.name={model_dir}", "model.dtype=float32", "strategy.lora.r=4", "strategy.procl.num_slots=2",
        "strategy.procl.consolidate_every=1", "training.batch_size=2", "training.lr=0.01",
        f"deepspeed.zero_stage={stage}", "deepspeed.stage3_param_persistence_threshold=0", "evaluation.batch_size=4",
    ]).on_device("cpu")
    base_model, tokenizer = load_base_model(config, torch.device("cpu"))
    weights = {name: p for name, p in base_model.named_parameters()}
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in weights.values())
    whole = sum(getattr(p, "ds_numel", p.numel()) for p in weights.values())
    visible = sum(p.numel() for p in weights.values())  # what a rank holds outside a gather
    tasks = [_task(i) for i in range(TASKS)]
    tokenize = TokenizeBatch(lambda: tokenizer, 64, True)
    collate = TrimPadding(labeled_logits_only=True)
    state, scores = None, []
    for index, task in enumerate(tasks):
        model, strategy = attach_strategy(config, base_model, state)
        torch.manual_seed(index)
        strategy.before_task(model, index)
        optimizer = torch.optim.AdamW(strategy.param_groups(model, config.training.lr), lr=config.training.lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config),
                                          lr_scheduler=lr_schedule(config, STEPS, 0))
        engine.train()
        pairs = task.training_texts()[rank::2]
        rows = tokenize({"prompt": np.array([p for p, _ in pairs], dtype=object), "continuation": np.array([c for _, c in pairs], dtype=object)})
        batches = [collate({k: v[i:i + 2] for k, v in rows.items()}) for i in range(0, 2 * STEPS, 2)]
        progress = {"steps": 0, "losses": []}
        train_steps(engine, model, strategy, batches, progress, STEPS, 1)
        strategy.after_task(model, index, task.training_texts(), engine)
        state = strategy.state(model)
        engine.destroy()
        scores.append(score(config, model, tokenizer, tasks[: index + 1], rank, 2))
        base_model = model.unload()
    if rank == 0:
        model, strategy = attach_strategy(config, base_model, state)
        strategy.export(model, out / f"adapter-z{stage}")
        (out / f"z{stage}.json").write_text(json.dumps({"held": held, "whole": whole, "visible": visible, "weights": len(weights), "scores": scores,
                                                        "losses": progress["losses"]}))
        torch.save(state[0], out / f"state-z{stage}.pt")


def _check_built_in_tiny_model(rank: int, out: Path) -> None:
    """A model built from its config (the tiny test models) is partitioned as it is created, with the same weights."""
    import deepspeed

    from pipeline.models import load_model_and_tokenizer
    from pipeline.runtime import deepspeed_config

    config = load_config(None, ["model.name=tiny-llama", "deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0"])
    partitioned, _ = load_model_and_tokenizer(config.model, zero3=deepspeed_config(config.on_device("cpu")))
    whole, _ = load_model_and_tokenizer(config.model)
    visible = sum(p.numel() for p in partitioned.parameters())
    with deepspeed.zero.GatheredParameters(list(partitioned.parameters())):
        differences = {name: (p - whole.get_parameter(name)).abs().max().item() for name, p in partitioned.named_parameters()}
    if rank == 0:
        (out / "built-in.json").write_text(json.dumps({"visible": visible, "differences": differences}))


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(rank_env(rank, 2, port))
    init_deepspeed_gloo()
    for stage in STAGES:
        _run_stage(rank, stage, model_dir, Path(out))
    _check_built_in_tiny_model(rank, Path(out))


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> Path:
    from pipeline.models import ModelSpec, load_model_and_tokenizer

    out = tmp_path_factory.mktemp("zero3")
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    mp.spawn(_worker, args=(free_port(), str(out / "model"), str(out)), nprocs=2, join=True)
    return out


def test_under_zero3_each_rank_holds_only_its_partition_of_the_base_weights(outcome):
    zero2, zero3 = (json.loads((outcome / f"z{stage}.json").read_text()) for stage in STAGES)
    assert zero2["held"] == zero2["whole"] == zero2["visible"]  # ZeRO-2: every rank holds the whole model
    assert zero3["whole"] == zero2["whole"]
    assert zero3["visible"] == 0  # outside a forward pass no weight is gathered
    # this rank's partitions: half the weights, plus at most one element of padding per weight
    assert zero3["whole"] / 2 <= zero3["held"] <= zero3["whole"] / 2 + zero3["weights"]


def test_a_zero3_chain_trains_consolidates_scores_and_exports_as_under_zero2(outcome):
    zero2, zero3 = (json.loads((outcome / f"z{stage}.json").read_text()) for stage in STAGES)
    assert zero3["scores"] == zero2["scores"]
    torch.testing.assert_close(torch.tensor(zero3["losses"]), torch.tensor(zero2["losses"]), rtol=1e-4, atol=1e-5)
    state2, state3 = (torch.load(outcome / f"state-z{stage}.pt") for stage in STAGES)
    assert state2.keys() == state3.keys() and any("lora_B" in name for name in state2)
    for name, tensor in state2.items():
        torch.testing.assert_close(state3[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    exported2, exported3 = (load_file(str(outcome / f"adapter-z{stage}" / "adapter_model.safetensors")) for stage in STAGES)
    assert exported2.keys() == exported3.keys()
    for name, tensor in exported2.items():
        torch.testing.assert_close(exported3[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_model_built_from_its_config_is_created_partitioned_with_the_same_weights(outcome):
    built_in = json.loads((outcome / "built-in.json").read_text())
    assert built_in["visible"] == 0
    assert built_in["differences"] and max(built_in["differences"].values()) == 0, built_in["differences"]
