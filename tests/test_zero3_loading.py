"""ZeRO-3 loading of the base model (`pipeline.runtime.load_base_model`): created partitioned over the ranks, so
no rank ever holds it whole, and a chain on it ends as under ZeRO-2.

2 gloo ranks on CPU, a tiny Llama read from a model folder (the `from_pretrained` path a user's model takes),
`stage3_param_persistence_threshold: 0` so that even its small weights are partitioned. Each stage runs the
worker runtime the Ray workers run: the base model loaded once, two ProCL tasks (plain LoRA, then program
memory with consolidation) attached, trained, scored on the same model and detached, then the export.
Then the ranks score shards that on their own would run different forward passes on a partitioned model
(`pipeline.evaluation.Lockstep`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import init_deepspeed_gloo, rank_env, spawn_ranks
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.streams import Task

STAGES = (2, 3)
TASKS, STEPS = 2, 3
# ZeRO-2 all-reduces the gradients, ZeRO-3 reduce-scatters them: the sums round differently, and AdamW's
# normalised steps carry that into the weights (up to 4e-4 of a LoRA weight's scale on an AVX512 CPU)
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}


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

    from pipeline.preprocess import TrainingCollate
    from pipeline.tokenizing import TokenizeBatch
    from pipeline.runtime import deepspeed_config, inference_engine, load_base_model, lr_schedule, score, train_steps
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
    collate = TrainingCollate(labeled_logits_only=True)
    with inference_engine(config, base_model):  # the zero-shot row: no training engine yet
        scores = [score(config, base_model, tokenizer, tasks, rank, 2)]
    state = None
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
        scores.append(score(config, model, tokenizer, tasks[: index + 1], rank, 2))  # in the live engine
        engine.destroy()
        base_model = model.unload()
    visible_after = sum(p.numel() for p in base_model.parameters())
    if rank == 0:
        model, strategy = attach_strategy(config, base_model, state)
        strategy.export(model, out / f"adapter-z{stage}")
        (out / f"z{stage}.json").write_text(json.dumps({"held": held, "whole": whole, "visible": visible, "visible_after": visible_after,
                                                        "weights": len(weights), "scores": scores,
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


def _label_task(name: str, validation: list[str], test: list[str]) -> Task:
    rows = {split: [{"text": text, "target": ["yes", "no"][n % 2]} for n, text in enumerate(texts)]
            for split, texts in (("validation", validation), ("test", test))}
    return Task(name=name, instruction="Answer yes or no.", metric="accuracy", answers=["yes", "no", "maybe", "unsure"],
                splits={"train": rows["validation"], **rows})


def _score_shards_in_lockstep(rank: int, model_dir: str, out: Path) -> None:
    """Rank 0's and rank 1's shards, scored alone, would run different forward passes: 3 prompts against 2
    (batches of 2), long prompts against short ones (one candidate per chunk against all four), a greedy
    batch that stops at its first token against one that goes on, no shared prefix against one. Scored
    in lock step on the partitioned model, each gives what the whole model gives it in one process."""
    import torch.distributed as dist

    from pipeline.evaluation import Lockstep, label_log_likelihoods
    from pipeline.models import load_model_and_tokenizer
    from pipeline.prompts import format_prompt
    from pipeline.runtime import deepspeed_config, inference_engine
    from pipeline.scoring import count_correct, scores_from_counts

    config = load_config(None, [
        f"model.name={model_dir}", "model.dtype=float32", "deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0",
        "evaluation.batch_size=2", "evaluation.candidate_pass_mib=0.3", "evaluation.max_new_tokens=6",
    ]).on_device("cpu")
    partitioned, tokenizer = load_model_and_tokenizer(config.model, zero3=deepspeed_config(config))
    whole, _ = load_model_and_tokenizer(config.model)
    # rank 0 scores "stops" (validation and test), rank 1 "goes on": the model's EOS is the first token it
    # predicts after "stops"
    stops, goes_on = "the team won the match", "shares rose after the report"
    first_tokens = [whole(**tokenizer(format_prompt("", text), return_tensors="pt")).logits[0, -1].argmax().item()
                    for text in (stops, goes_on)]
    for model in (partitioned, whole):
        model.generation_config.eos_token_id = first_tokens[0]
    generation = Task(name="stopping", instruction="", metric="exact_match", answers=[],
                      splits={split: [{"text": stops, "target": "o"}, {"text": goes_on, "target": "o"}]
                              for split in ("train", "validation", "test")})
    short, long = "is it so", " ".join(["is it so"] * 80)
    tasks = [_label_task("uneven", ["is it a", "is it b", "is it c"], ["is it d", "is it e"]),
             _label_task("lengths", [long, short], [long, short]), generation]
    lockstep = Lockstep(torch.device("cpu"))
    gathered: list = [None, None]
    prompts = [["alpha", "beta"], ["gamma delta", "gamma epsilon"]][rank]  # rank 0's share no prefix
    with inference_engine(config, partitioned):
        dist.all_gather_object(gathered, count_correct(partitioned, tokenizer, tasks, config, rank, 2, lockstep))
        likelihoods = label_log_likelihoods(partitioned, tokenizer, prompts, ["yes", "no"], lockstep=lockstep)
    difference = (likelihoods - label_log_likelihoods(whole, tokenizer, prompts, ["yes", "no"])).abs().max().item()
    differences: list = [None, None]
    dist.all_gather_object(differences, difference)
    if rank == 0:
        (out / "lockstep.json").write_text(json.dumps({
            "sharded": scores_from_counts(gathered), "whole": scores_from_counts([count_correct(whole, tokenizer, tasks, config)]),
            "counts": gathered, "first_tokens": first_tokens, "likelihood_differences": differences,
        }))


def _worker(rank: int, port: int, model_dir: str, lively_dir: str, out: str) -> None:
    os.environ.update(rank_env(rank, 2, port))
    init_deepspeed_gloo()
    for stage in STAGES:
        _run_stage(rank, stage, model_dir, Path(out))
    _check_built_in_tiny_model(rank, Path(out))
    _score_shards_in_lockstep(rank, lively_dir, Path(out))


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> Path:
    from pipeline.models import ModelSpec, load_model_and_tokenizer

    out = tmp_path_factory.mktemp("zero3")
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    # weights large enough that the greedy answer depends on the prompt (the tiny model's are not)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.5)
    model.save_pretrained(out / "lively")
    tokenizer.save_pretrained(out / "lively")
    spawn_ranks(_worker, str(out / "model"), str(out / "lively"), str(out))
    return out


def test_under_zero3_each_rank_holds_only_its_partition_of_the_base_weights(outcome):
    zero2, zero3 = (json.loads((outcome / f"z{stage}.json").read_text()) for stage in STAGES)
    assert zero2["held"] == zero2["whole"] == zero2["visible"]  # ZeRO-2: every rank holds the whole model
    assert zero3["whole"] == zero2["whole"]
    assert zero3["visible"] == zero3["visible_after"] == 0  # outside a forward pass no weight is gathered, after
    # the chain's training and scoring neither
    # this rank's partitions: half the weights, plus at most one element of padding per weight
    assert zero3["whole"] / 2 <= zero3["held"] <= zero3["whole"] / 2 + zero3["weights"]


def test_a_zero3_chain_trains_consolidates_scores_and_exports_as_under_zero2(outcome):
    zero2, zero3 = (json.loads((outcome / f"z{stage}.json").read_text()) for stage in STAGES)
    assert zero3["scores"] == zero2["scores"]
    torch.testing.assert_close(torch.tensor(zero3["losses"]), torch.tensor(zero2["losses"]), **TOLERANCE)
    state2, state3 = (torch.load(outcome / f"state-z{stage}.pt") for stage in STAGES)
    assert state2.keys() == state3.keys() and any("lora_B" in name for name in state2)
    for name, tensor in state2.items():
        torch.testing.assert_close(state3[name], tensor, **TOLERANCE, msg=name)
    exported2, exported3 = (load_file(str(outcome / f"adapter-z{stage}" / "adapter_model.safetensors")) for stage in STAGES)
    assert exported2.keys() == exported3.keys()
    for name, tensor in exported2.items():
        torch.testing.assert_close(exported3[name], tensor, **TOLERANCE, msg=name)


def test_a_model_built_from_its_config_is_created_partitioned_with_the_same_weights(outcome):
    built_in = json.loads((outcome / "built-in.json").read_text())
    assert built_in["visible"] == 0
    assert built_in["differences"] and max(built_in["differences"].values()) == 0, built_in["differences"]


def test_zero3_ranks_score_shards_that_need_different_forward_passes_in_lock_step(outcome):
    lockstep = json.loads((outcome / "lockstep.json").read_text())
    assert lockstep["first_tokens"][0] != lockstep["first_tokens"][1]  # one rank's greedy batch stops, the other's not
    rank0, rank1 = lockstep["counts"]
    assert [rank0["validation"]["uneven"][1], rank1["validation"]["uneven"][1]] == [2, 1]  # the top-up is not counted
    assert lockstep["sharded"] == lockstep["whole"]
    assert max(lockstep["likelihood_differences"]) < 1e-4
