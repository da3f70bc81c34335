"""The worker runtime: what a training worker does with its model, importable without Ray.

The Ray Train worker loop (`pipeline.train_worker.train_chain`) calls these functions, and so does
scripts/gpu_check.py, in one process on a GPU machine that has no Ray: DeepSpeed set-up and config, the
base model loaded once per worker (partitioned over the ranks under ZeRO-3), a task's optimizer steps
through the strategy hooks, each rank's optimizer partition saved and restored, and scoring sharded over
the ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.config import ChainConfig
from pipeline.evaluation import Lockstep
from pipeline.memory import WorkerMemory
from pipeline.models import load_model_and_tokenizer
from pipeline.scoring import count_correct, scores_from_counts
from procl.checkpoint import sha256_file
from procl.distributed import all_reduce_mean, write_full

OPTIMIZER = "optimizer"  # a checkpoint's folder of the ranks' optimizer partitions
# Progress goes through logging, not print: Ray Train's workers turn print() into a log record *and* a
# print, so every progress line reached the driver's console twice.
console = logging.getLogger(__name__)


def deepspeed_config(config: ChainConfig) -> dict[str, Any]:
    """The DeepSpeed config a task trains with (the optimizer is a torch AdamW passed in: nothing JIT-compiles).
    `config` is settled for its device (`ChainConfig.on_device`): precision is decided by then."""
    if config.deepspeed.bf16 is None:
        raise ValueError("deepspeed_config needs a config settled for its device (ChainConfig.on_device): deepspeed.bf16 is still None")
    zero: dict[str, Any] = {"stage": config.deepspeed.zero_stage}
    if config.deepspeed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = config.deepspeed.stage3_param_persistence_threshold
    offload = config.deepspeed.offload_optimizer
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        # with offload the client AdamW steps on DeepSpeed's CPU copies; DeepSpeed's own CPU Adam would
        # JIT-compile first (~70 s, ~2 GB of compiler memory), and it refuses a client optimizer unless told
        "zero_force_ds_cpu_optimizer": not offload,
        "train_micro_batch_size_per_gpu": config.training.batch_size,
        "gradient_accumulation_steps": config.training.gradient_accumulation,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": config.deepspeed.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def init_deepspeed(use_gpu: bool):
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not use_gpu:
        # DeepSpeed's CPU shared-memory allreduce JIT-compiles for ~64 s on first use; gloo does the job
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # joins Ray Train's process group
    return deepspeed


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that DeepSpeed steps: inside its ZeRO / bf16 optimizer, or itself (ZeRO-0 fp32)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _stepped_tensors(engine) -> list[torch.Tensor]:
    """The tensors AdamW keeps state for, in a fixed order: this rank's ZeRO-3 flat fp32 partitions (which
    DeepSpeed puts into the optimizer's param_groups only while it steps them), else its param_groups."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    return list(flat) if flat is not None else [p for group in base_optimizer(engine).param_groups for p in group["params"]]


def _trainable_parameters(engine) -> list[list]:
    """[name, shape] of each trainable parameter of the engine's model: what its optimizer state belongs to
    (the whole shape under ZeRO-3 too, where a parameter holds only its shard)."""
    return [[name, list(getattr(p, "ds_shape", p.shape))] for name, p in engine.module.named_parameters() if p.requires_grad]


def save_optimizer_state(engine, folder: Path, rank: int) -> None:
    """This rank's AdamW state (moments and step of its ZeRO partition) as safetensors + a sha256 file, with the
    trainable parameters it belongs to in the file's metadata."""
    state = base_optimizer(engine).state
    tensors = {f"{index}.{name}": (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().contiguous()
               for index, tensor in enumerate(_stepped_tensors(engine)) for name, value in state.get(tensor, {}).items()}
    path = folder / OPTIMIZER / f"rank_{rank}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"trainable_parameters": json.dumps(_trainable_parameters(engine))})
    path.with_suffix(".sha256").write_text(sha256_file(path))


@dataclass(frozen=True)
class SavedOptimizerState:
    """A rank's AdamW state read from a checkpoint: moments and step by stepped tensor, and the trainable
    parameters it was saved for (None in a checkpoint written before they were recorded)."""

    path: Path
    tensors: dict[int, dict[str, torch.Tensor]]
    trainable_parameters: list[list] | None


def read_optimizer_state(folder: Path, rank: int) -> SavedOptimizerState | None:
    """A rank's saved AdamW state (None if the checkpoint has none for it); refuses an altered file."""
    path = folder / OPTIMIZER / f"rank_{rank}.safetensors"
    if not path.is_file():
        return None
    digest = path.with_suffix(".sha256")
    if not digest.is_file() or sha256_file(path) != digest.read_text().strip():
        raise ValueError(f"{path} does not match its recorded sha256: truncated or altered; it will not be loaded")
    tensors: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as file:  # one read for the tensors and the metadata
        for key in file.keys():
            index, name = key.split(".", 1)
            tensors.setdefault(int(index), {})[name] = file.get_tensor(key)
        recorded = (file.metadata() or {}).get("trainable_parameters")
    return SavedOptimizerState(path, tensors, None if recorded is None else json.loads(recorded))


def load_optimizer_state(engine, saved: SavedOptimizerState) -> None:
    """Put saved AdamW state into a fresh engine of the same layout (trainable parameters, world size, ZeRO stage).
    Refuses state saved for other trainable parameters: moments are kept by position, so they would land on the
    wrong parameters wherever the shapes happen to agree."""
    here = _trainable_parameters(engine)
    if saved.trainable_parameters is not None and saved.trainable_parameters != here:
        differ = next(((a, b) for a, b in zip(saved.trainable_parameters, here) if a != b), None)
        detail = (f"first difference: saved {differ[0][0]} {tuple(differ[0][1])}, here {differ[1][0]} {tuple(differ[1][1])}"
                  if differ else f"saved {len(saved.trainable_parameters)} trainable parameters, here {len(here)}")
        raise ValueError(f"{saved.path} holds optimizer state for other trainable parameters than this model's ({detail}); "
                         "was the checkpoint written with another strategy, LoRA config or version of procl?")
    tensors = _stepped_tensors(engine)
    for index, entry in saved.tensors.items():
        expected = tensors[index].shape if index < len(tensors) else None
        if expected is None or entry["exp_avg"].shape != expected:
            raise ValueError(f"{saved.path} does not fit this worker's optimizer partition (tensor {index}: saved "
                             f"{tuple(entry['exp_avg'].shape)}, here {None if expected is None else tuple(expected)}); "
                             "was the checkpoint written with another num_workers or ZeRO stage?")
    optimizer = base_optimizer(engine)
    for index, entry in saved.tensors.items():
        target = tensors[index]
        # moments on the partition's device and dtype; AdamW keeps its step counter as a CPU float32 scalar
        optimizer.state[target] = {name: value if name == "step" else value.to(target.device, target.dtype)
                                   for name, value in entry.items()}


def restore_masters(engine, model, tensors: dict[str, torch.Tensor]) -> None:
    """Write a chain state's float32 tensors (`strategy.state`, read from the optimizer's masters) into the fp32
    masters a bf16 engine keeps of the trainable weights. The engine builds them from the bf16 weights that
    `restore_state` rounded the state to, so a task resumed mid-way would otherwise go on from rounded masters
    and not end as it would have uninterrupted. Collective under DeepSpeed: every rank calls it."""
    if not engine.bfloat16_enabled():
        return
    for name, param in model.named_parameters():
        if param.requires_grad and name in tensors:
            write_full(param, tensors[name].to(param.device), engine=engine)


def load_base_model(config: ChainConfig, device: torch.device):
    """(base model, tokenizer) for the whole chain, on this worker's `device` in the settled dtype, with
    activation checkpointing when training.gradient_checkpointing (non-reentrant; transformers registers the
    input-gradient hook that LoRA on a frozen base needs). Under ZeRO-3 it is created partitioned over the ranks
    (`deepspeed.zero.Init`): no rank ever holds all of it. Each task attaches its adapters to it and detaches them.
    Collective under ZeRO-3: every rank calls it."""
    zero3 = deepspeed_config(config) if config.deepspeed.zero_stage == 3 else None
    model, tokenizer = load_model_and_tokenizer(config.model, device, zero3=zero3)
    if config.training.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, tokenizer


def lr_schedule(config: ChainConfig, steps: int, steps_done: int):
    """The task's LR schedule for `deepspeed.initialize` (built on the optimizer DeepSpeed steps): transformers'
    `get_scheduler` over the task's `steps`, moved on by the `steps_done` that a resumed task has trained."""
    from transformers import get_scheduler

    def build(optimizer: torch.optim.Optimizer):
        schedule = get_scheduler(config.training.lr_scheduler, optimizer, num_warmup_steps=config.training.warmup_steps,
                                 num_training_steps=steps)
        with warnings.catch_warnings():  # stepping the schedule alone, before any optimizer step, is the point here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            for _ in range(steps_done):
                schedule.step()
        return schedule

    return build


def train_steps(engine, model, strategy, batches: Iterable[dict[str, torch.Tensor]], progress: dict[str, Any], total_steps: int,
                accumulation: int, after_step: Callable[[float], None] | None = None) -> None:
    """A task's optimizer steps over `batches` (micro-batches), until `total_steps`: the task loss plus the strategy's
    extra loss, DeepSpeed's backward and step (the LR schedule steps with it), and the strategy's hook after each
    optimizer step. `progress` (steps done, and per optimizer step the task loss averaged over its micro-batches
    and the ranks) is updated in place; the micro-batches of the steps it already counts are skipped (a task
    resumed from an in-task checkpoint). `after_step(loss)` runs after each optimizer step with that loss."""
    micro_steps_done = progress["steps"] * accumulation
    step_losses: list[torch.Tensor] = []
    for micro_step, batch in enumerate(batches, start=1):
        if micro_step <= micro_steps_done:
            continue
        if progress["steps"] == total_steps:  # training.max_steps reached
            break
        segments = batch.pop("segments", None)
        with strategy.micro_batch(model, segments):  # ProCL routes each example, padded or packed, by its own tokens
            loss = engine(**batch, use_cache=False).loss  # no cache: with one, transformers ignores a packed row's positions
            extra = strategy.extra_loss(model)
            engine.backward(loss if extra is None else loss + extra)
        engine.step()
        step_losses.append(loss.detach().float())
        if micro_step % accumulation:
            continue
        strategy.after_optimizer_step(model, engine)
        progress["steps"] += 1
        progress["losses"].append(all_reduce_mean(torch.stack(step_losses).mean()).item())  # collective: every rank
        step_losses.clear()
        if after_step is not None:
            after_step(progress["losses"][-1])



def settle_precision(config: ChainConfig, device: torch.device, rank: int) -> ChainConfig:
    """The config with its precision settled for rank 0's device and shared with every rank: DeepSpeed
    needs all ranks in one precision, whatever hardware each landed on."""
    import torch.distributed as dist

    settled = [config.on_device(device).model_dump(mode="json") if rank == 0 else None]
    dist.broadcast_object_list(settled, src=0)
    if rank == 0 and device.type != "cpu":  # a CPU chain's driver has said it already
        console.info(config.precision_note())
    return ChainConfig.model_validate(settled[0])


def largest_memory(mine: WorkerMemory, world_size: int) -> WorkerMemory:
    """The memory of the rank whose models took the most model copies (collective: every rank calls it)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return max(gathered, key=WorkerMemory.models_over_copy)


@contextlib.contextmanager
def inference_engine(config: ChainConfig, model) -> Iterator[None]:
    """Under ZeRO-3, DeepSpeed's forward hooks on `model` for the duration (an engine without an optimizer):
    a forward pass outside a training engine, such as the zero-shot row's, needs them to gather each layer's
    partitioned weights and to release them after. Otherwise nothing."""
    if config.deepspeed.zero_stage != 3:
        yield
        return
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(config))
    try:
        yield
    finally:
        engine.destroy()


def score(config: ChainConfig, model, tokenizer, tasks: list, rank: int, world_size: int) -> dict[str, dict[str, float]]:
    """{split: {task: score}} of `model` (on this worker's device, eval mode for the duration). Each rank scores
    every `world_size`-th example of each split and the counts are summed.

    Under ZeRO-3, where every forward pass gathers the partitioned weights from all ranks, the ranks score
    their shards in lock step, and `model` must be in a live DeepSpeed engine: the task's training engine, or
    `inference_engine`. (Once an engine is destroyed, a forward pass gathers each layer's weights and keeps
    them: every rank would end up holding the whole model.)"""
    import torch.distributed as dist

    lockstep = Lockstep(model.device) if config.deepspeed.zero_stage == 3 else None
    counts = count_correct(model, tokenizer, tasks, config, rank, world_size, lockstep)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, counts)
    return scores_from_counts(gathered)
