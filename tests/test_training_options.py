"""Training options of large-model fine-tuning, as the worker loop uses them: activation checkpointing
(LoRA still gets its gradients), transformers' LR schedules stepped by DeepSpeed and resumed mid-task,
a step budget per task, the loss of each optimizer step averaged over its micro-batches and the ranks, a bf16 task resumed from its fp32 masters,
AdamW state refused for other parameters than it was saved for, and FlashAttention-2 refused where it
cannot run."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import batch, init_deepspeed_gloo, rank_env, spawn_ranks

from pipeline.chain import steps_per_task
from pipeline.config import load_config
from pipeline.models import ModelSpec
from pipeline.scoring import attach_strategy
from pipeline.runtime import load_base_model, lr_schedule, train_steps

TINY = ["model.name=tiny-llama", "strategy.lora.r=4", "strategy.procl.num_slots=2"]


def _lora_gradients(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """LoRA gradients of one backward pass, and how many times the layers' attention ran forward (inside a
    checkpointed layer: transformers keeps the layer's own hooks outside the checkpoint)."""
    config = load_config(None, TINY + [f"training.gradient_checkpointing={str(checkpointing).lower()}"]).on_device("cpu")
    torch.manual_seed(0)
    model, strategy = attach_strategy(config, load_base_model(config, torch.device("cpu"))[0], None)
    strategy.before_task(model, 0)
    model.train()
    layer_calls = []
    for layer in model.base_model.model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: layer_calls.append(1))
    ids = batch(seed=1)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name and p.requires_grad}
    return grads, len(layer_calls)


def test_gradient_checkpointing_recomputes_the_layers_and_gives_lora_the_same_gradients():
    plain, plain_calls = _lora_gradients(False)
    checkpointed, checkpointed_calls = _lora_gradients(True)
    assert checkpointed_calls == 2 * plain_calls  # each layer ran again in the backward pass: activations were not kept
    assert plain and checkpointed.keys() == plain.keys()
    assert any(g.abs().sum() > 0 for g in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)


def _schedule_worker(rank: int, port: int, out: str) -> None:
    """One DeepSpeed rank: the LR of each optimizer step of a 6-step task, from step 0 and resumed at step 3."""
    os.environ.update(rank_env(rank, 1, port))
    deepspeed = init_deepspeed_gloo()
    from pipeline.runtime import deepspeed_config

    config = load_config(None, TINY + ["training.lr=0.01", "training.batch_size=2", "training.lr_scheduler=linear",
                                       "training.warmup_steps=2", "deepspeed.zero_stage=2",
                                       "deepspeed.bf16=false"]).on_device("cpu")
    seen = {}
    for steps_done in (0, 3):
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.training.lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config),
                                          lr_scheduler=lr_schedule(config, 6, steps_done))
        seen[steps_done] = []
        for _ in range(6 - steps_done):
            seen[steps_done].append(engine.get_lr()[0])
            engine.backward(engine(torch.ones(2, 4)).sum())
            engine.step()
        engine.destroy()
    Path(out).write_text(json.dumps(seen))


def test_the_lr_schedule_warms_up_decays_and_resumes_mid_task_where_it_was(tmp_path):
    out = tmp_path / "lrs.json"
    spawn_ranks(_schedule_worker, str(out), nprocs=1)
    seen = json.loads(out.read_text())
    # linear warm-up over 2 steps, then linear decay to 0 at the task's 6th step, stepped by DeepSpeed's engine
    expected = [0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025]
    assert seen["0"] == pytest.approx(expected)
    assert seen["3"] == pytest.approx(expected[3:])  # a task resumed at step 3 goes on where it was


def _masters_worker(rank: int, port: int, out: str) -> None:
    """One bf16 DeepSpeed rank: a weight restored as `restore_state` does (into the model), then its fp32 master."""
    os.environ.update(rank_env(rank, 1, port))
    deepspeed = init_deepspeed_gloo()
    from pipeline.runtime import deepspeed_config, restore_masters
    from procl.distributed import read_full

    config = load_config(None, TINY + ["deepspeed.zero_stage=2", "deepspeed.bf16=true"]).on_device("cpu")
    state = {"weight": torch.tensor([[1 + 2**-12, 3 - 2**-10, 0.1, -0.3]])}  # more bits than bf16 keeps
    model = torch.nn.Linear(4, 1, bias=False)
    model.load_state_dict(state)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=deepspeed_config(config))
    built = read_full(model.weight)
    restore_masters(engine, model, state)
    Path(out).write_text(json.dumps({"built": built.tolist(), "restored": read_full(model.weight).tolist(), "state": state["weight"].tolist()}))
    engine.destroy()


def test_a_bf16_task_resumed_mid_way_goes_on_from_the_fp32_masters_of_its_checkpoint(tmp_path):
    out = tmp_path / "masters.json"
    spawn_ranks(_masters_worker, str(out), nprocs=1)
    seen = json.loads(out.read_text())
    assert seen["built"] != seen["state"]  # the engine builds its masters from the bf16 weights: rounded
    assert seen["restored"] == seen["state"]


def _named_pair(first: str, second: str) -> torch.nn.Module:
    """Two 4x4 linear layers under the given names: the same shapes, in the same order, named differently."""
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict([(first, torch.nn.Linear(4, 4)), (second, torch.nn.Linear(4, 4))]))


def _optimizer_state_worker(rank: int, port: int, out: str) -> None:
    """One DeepSpeed rank: AdamW state saved mid-task, loaded into a model with other parameter names, and into
    the same model from a file written before the trainable parameters were recorded (its metadata stripped)."""
    os.environ.update(rank_env(rank, 1, port))
    deepspeed = init_deepspeed_gloo()
    from safetensors.torch import load_file, save_file

    from pipeline.runtime import OPTIMIZER, deepspeed_config, load_optimizer_state, read_optimizer_state, save_optimizer_state
    from procl.checkpoint import sha256_file

    config = load_config(None, TINY + ["deepspeed.zero_stage=0", "deepspeed.bf16=false"]).on_device("cpu")

    def engine_of(model: torch.nn.Module):
        return deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=deepspeed_config(config))[0]

    engine = engine_of(_named_pair("encoder", "decoder"))
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    folder = Path(out)
    save_optimizer_state(engine, folder, 0)
    outcome = {}
    try:
        load_optimizer_state(engine_of(_named_pair("query", "value")), read_optimizer_state(folder, 0))
        outcome["renamed"] = "loaded"
    except ValueError as error:
        outcome["renamed"] = str(error)
    path = folder / OPTIMIZER / "rank_0.safetensors"
    save_file(load_file(str(path)), str(path))  # as written before: no metadata
    path.with_suffix(".sha256").write_text(sha256_file(path))
    unrecorded = read_optimizer_state(folder, 0)
    same = engine_of(_named_pair("encoder", "decoder"))
    load_optimizer_state(same, unrecorded)
    outcome["unrecorded"] = {"trainable_parameters": unrecorded.trainable_parameters,
                             "steps": [float(entry["step"]) for entry in same.optimizer.state.values()]}
    Path(out, "outcome.json").write_text(json.dumps(outcome))


def test_optimizer_state_saved_for_other_trainable_parameters_is_refused_naming_its_file(tmp_path):
    spawn_ranks(_optimizer_state_worker, str(tmp_path), nprocs=1)
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    # the same shapes in the same order: only the recorded names tell that the moments belong to other parameters
    assert str(tmp_path / "optimizer" / "rank_0.safetensors") in outcome["renamed"]
    assert "other trainable parameters" in outcome["renamed"] and "encoder.weight" in outcome["renamed"]
    # a checkpoint from before the names were recorded still loads, checked by shape alone
    assert outcome["unrecorded"] == {"trainable_parameters": None, "steps": [1.0] * 4}


class _RecordingEngine:
    """The DeepSpeed engine, with the task loss of each micro-batch this rank ran noted down."""

    def __init__(self, engine) -> None:
        self.engine, self.micro_losses = engine, []

    def __call__(self, **batch):
        output = self.engine(**batch)
        self.micro_losses.append(output.loss.item())
        return output

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def _step_loss_worker(rank: int, port: int, out: str) -> None:
    """One of 2 DeepSpeed ranks, each with its own data: 3 optimizer steps of 2 micro-batches."""
    os.environ.update(rank_env(rank, 2, port))
    deepspeed = init_deepspeed_gloo()
    from pipeline.runtime import deepspeed_config

    config = load_config(None, TINY + ["training.gradient_accumulation=2", "training.batch_size=2", "deepspeed.zero_stage=2",
                                       "deepspeed.bf16=false"]).on_device("cpu")
    torch.manual_seed(0)
    model, strategy = attach_strategy(config, load_base_model(config, torch.device("cpu"))[0], None)
    strategy.before_task(model, 0)
    optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-2))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config))
    recording = _RecordingEngine(engine)
    batches = [{"input_ids": ids, "labels": ids} for ids in (batch(seed=10 * rank + k, size=2) for k in range(6))]
    progress = {"steps": 0, "losses": []}
    train_steps(recording, model, strategy, batches, progress, 3, config.training.gradient_accumulation)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"micro": recording.micro_losses, "steps": progress["losses"]}))
    engine.destroy()


def test_the_loss_of_an_optimizer_step_is_averaged_over_its_micro_batches_and_the_ranks(tmp_path):
    spawn_ranks(_step_loss_worker, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["micro"] != ranks[1]["micro"]  # the ranks ran different data
    expected = [sum(r["micro"][2 * step] + r["micro"][2 * step + 1] for r in ranks) / 4 for step in range(3)]
    for rank in ranks:
        assert len(rank["micro"]) == 6
        assert rank["steps"] == pytest.approx(expected, rel=1e-6)  # one loss per optimizer step, the same on every rank


def test_the_default_schedule_keeps_the_configured_lr():
    config = load_config(None)
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=config.training.lr)
    schedule = lr_schedule(config, 5, 0)(optimizer)
    lrs = []
    for _ in range(5):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs == [config.training.lr] * 5


@pytest.mark.parametrize(("examples", "settings", "steps"), [
    (16, [], 2),                                        # 2 workers x batch 4: 8 rows a step
    (20, [], 3),                                        # each worker's 10 rows: batches of 4, 4 and 2
    (20, ["training.gradient_accumulation=2"], 1),      # 3 micro-batches make one full step
    (16, ["training.epochs=3"], 6),
    (16, ["training.epochs=3", "training.max_steps=4"], 4),  # the step budget
    (16, ["training.max_steps=10"], 2),                 # a budget above what the data gives changes nothing
])
def test_steps_per_task_counts_what_the_workers_train(examples, settings, steps):
    config = load_config(None, ["training.batch_size=4", "scaling.num_workers=2", *settings])
    assert steps_per_task(config, examples) == steps


def test_flash_attention_is_refused_where_it_cannot_run():
    import importlib.util

    spec = ModelSpec(name="tiny-llama", dtype="bfloat16", attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="flash_attention_2 runs on CUDA GPUs only, not on cpu"):
        spec.on_device("cpu")
    if importlib.util.find_spec("flash_attn") is None:  # as here: a GPU worker without the package is told what is missing
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            spec.on_device("cuda")
    config = load_config(None, ["model.attn_implementation=flash_attention_2"])
    with pytest.raises(ValueError, match="model.attn_implementation: flash_attention_2"):
        config.precision_note()  # what `run` and `plan` settle first, before anything starts
