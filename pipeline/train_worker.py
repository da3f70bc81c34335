"""The Ray Train worker loop of the chain: the zero-shot row, then task after task DeepSpeed ZeRO training
through the strategy hooks and scoring of every task seen so far, then the export, in one worker group
for the whole chain (the driver holds no model).

Reads top to bottom like Ray's DeepSpeed fine-tuning example. The same code runs on this CPU
machine (gloo) and on a multi-node GPU cluster (nccl): only `scaling.use_gpu` differs. One worker
group trains every task (a new one per task cost ~12 s of process start-up and imports each time,
benchmarks/pipeline_overhead.py); each task gets a fresh model, strategy and DeepSpeed engine.

Checkpoints (`ray.train.report`) hold `state/` (procl.checkpoint: adapter + strategy state,
safetensors + JSON) and `progress.json` (the task, optimizer steps done, training losses, the steps at
which the task resumed after failures); in-task ones also hold `optimizer/`, each rank's AdamW
moments of its ZeRO partition (Ray merges the ranks' files into one checkpoint folder), and each task
ends with one that also holds `result.json` (its scores and timings); the export's holds `adapter/` and
`progress.json`. The zero-shot row is a report without a checkpoint. A worker failure restarts the
group from the last one (`FailureConfig`) with weights, strategy state and optimizer moments as they
were, skipping the tasks already reported.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from pipeline.config import ChainConfig
from pipeline.models import accepts_logits_to_keep, load_model_and_tokenizer
from pipeline.preprocess import TrimPadding
from pipeline.ray_workers import verbose
from pipeline.scoring import count_correct, load_trained, model_to_score, scores_from_counts
from pipeline.task_results import ADAPTER, OPTIMIZER, PROGRESS, RESULT, STATE
from procl import make_strategy
from procl.checkpoint import read_state, sha256_file, write_state

# Progress goes through logging, not print: Ray Train's workers turn print() into a log record *and* a
# print, so every progress line reached the driver's console twice.
console = logging.getLogger(__name__)



def deepspeed_config(config: ChainConfig) -> dict[str, Any]:
    """The DeepSpeed config a task trains with (the optimizer is a torch AdamW passed in: nothing JIT-compiles).
    `config` is settled for its device (`ChainConfig.on_device`): precision is decided by then."""
    if config.deepspeed.bf16 is None:
        raise ValueError("deepspeed_config needs a config settled for its device (ChainConfig.on_device): deepspeed.bf16 is still None")
    zero: dict[str, Any] = {"stage": config.deepspeed.zero_stage}
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


def _init_deepspeed(use_gpu: bool):
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


def save_optimizer_state(engine, folder: Path, rank: int) -> None:
    """This rank's AdamW state (moments and step of its ZeRO partition) as safetensors + a sha256 file."""
    state = base_optimizer(engine).state
    tensors = {f"{index}.{name}": (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().contiguous()
               for index, tensor in enumerate(_stepped_tensors(engine)) for name, value in state.get(tensor, {}).items()}
    path = folder / OPTIMIZER / f"rank_{rank}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    path.with_suffix(".sha256").write_text(sha256_file(path))


def read_optimizer_state(folder: Path, rank: int) -> dict[int, dict[str, torch.Tensor]] | None:
    """A rank's saved AdamW state (None if the checkpoint has none for it); refuses an altered file."""
    path = folder / OPTIMIZER / f"rank_{rank}.safetensors"
    if not path.is_file():
        return None
    digest = path.with_suffix(".sha256")
    if not digest.is_file() or sha256_file(path) != digest.read_text().strip():
        raise ValueError(f"{path} does not match its recorded sha256: truncated or altered; it will not be loaded")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return state


def load_optimizer_state(engine, state: dict[int, dict[str, torch.Tensor]]) -> None:
    """Put saved AdamW state into a fresh engine of the same layout (world size, ZeRO stage, parameters)."""
    tensors = _stepped_tensors(engine)
    for index, entry in state.items():
        expected = tensors[index].shape if index < len(tensors) else None
        if expected is None or entry["exp_avg"].shape != expected:
            raise ValueError(f"saved optimizer state does not fit this worker's partition (tensor {index}: saved "
                             f"{tuple(entry['exp_avg'].shape)}, here {None if expected is None else tuple(expected)}); "
                             "was the checkpoint written with another num_workers or ZeRO stage?")
    optimizer = base_optimizer(engine)
    for index, entry in state.items():
        target = tensors[index]
        # moments on the partition's device and dtype; AdamW keeps its step counter as a CPU float32 scalar
        optimizer.state[target] = {name: value if name == "step" else value.to(target.device, target.dtype)
                                   for name, value in entry.items()}


def _report(state: tuple[dict, dict], progress: dict[str, Any], metrics: dict[str, float], engine=None,
            result: dict[str, Any] | None = None) -> None:
    """Every rank reports (Ray needs the same number of calls); rank 0 writes the state, progress and the
    task's `result`, and with `engine` (in-task checkpoints) every rank adds its optimizer partition."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if rank != 0 and engine is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            write_state(Path(folder) / STATE, *state)
            Path(folder, PROGRESS).write_text(json.dumps(progress))
            if result is not None:
                Path(folder, RESULT).write_text(json.dumps(result))
        if engine is not None:
            save_optimizer_state(engine, Path(folder), rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class _ProgressLine:
    """Rank 0 logs `task i/T step s/S loss ETA` about ten times per task (Ray forwards it to the driver)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.started = time.monotonic()
        self.every = max(1, self.total // 10)

    def update(self, step: int, loss: float) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        elapsed = time.monotonic() - self.started
        eta = elapsed / step * max(self.total - step, 0)
        console.info(f"[{self.label}] step {step}/{self.total} loss {loss:.4f} eta {eta:.0f}s")


@dataclass
class ResumePoint:
    """Where a (re)started worker group picks up in its plan, with what it needs to start there."""

    position: int  # the first entry of the plan to train (len(plan): none left)
    state: tuple[dict, dict] | None  # strategy state to start from (None: the base model)
    progress: dict[str, Any] | None  # the interrupted task's progress when it resumes mid-task
    optimizer_state: dict[int, dict[str, torch.Tensor]] | None
    this_fit: bool  # the checkpoint is this fit's: what it reported before (the zero-shot row) is not repeated


def _resume_point(plan: list[dict[str, Any]], fit_id: str, rank: int, previous_state: str | None) -> ResumePoint:
    """Where this (re)started worker group picks up.

    A checkpoint of this fit is trusted whole: after a task's end the next task starts, mid-task the task
    resumes, after the export nothing is left. One of an earlier fit of the chain (a driver killed and the
    chain re-submitted) is used only mid-way through the first planned task: had that fit finished the
    task, its results would have reached the driver's manifest, and the task would not be planned again,
    so they were lost and it is trained again. Otherwise the plan starts from `previous_state` (None: the
    first task of the chain).
    """
    import ray.train

    def from_previous_state(this_fit: bool = False) -> ResumePoint:
        return ResumePoint(0, read_state(previous_state) if previous_state is not None else None, None, None, this_fit)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return from_previous_state()
    with checkpoint.as_directory() as folder:
        progress = json.loads(Path(folder, PROGRESS).read_text())
        same_fit = progress["fit_id"] == fit_id
        if same_fit and Path(folder, ADAPTER).is_dir():  # the export was the last thing this fit did
            return ResumePoint(len(plan), None, None, None, True)
        indices = [entry["index"] for entry in plan]
        position = indices.index(progress["task_index"]) if progress["task_index"] in indices else None
        if position is None or not (same_fit or (position == 0 and not progress["task_done"])):
            return from_previous_state(same_fit)
        state = read_state(Path(folder) / STATE)
        if progress["task_done"]:
            return ResumePoint(position + 1, state, None, None, same_fit)
        return ResumePoint(position, state, progress, read_optimizer_state(Path(folder), rank), same_fit)


def build_training_model(config: ChainConfig, state: tuple[dict, dict] | None):
    """(model, strategy) to train a task from: the base model with the strategy's modules, at `state` (None: the
    chain's start), with activation checkpointing when training.gradient_checkpointing."""
    model, _ = load_model_and_tokenizer(config.model)
    if config.training.gradient_checkpointing:
        # non-reentrant, and transformers registers the input-gradient hook that LoRA on a frozen base needs
        model.activation_checkpointing_enable()
    strategy = make_strategy(config.strategy.name, seed=config.training.seed, **config.strategy.options())
    model = strategy.build(model)
    if state is not None:
        strategy.restore_state(model, *state)
    return model, strategy


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


def _micro_batches(shard, config: ChainConfig, collate: TrimPadding, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's micro-batches of the task, epoch after epoch."""
    for _ in range(config.training.epochs):
        yield from shard.iter_torch_batches(batch_size=config.training.batch_size, collate_fn=collate, device=device)


def train_chain(loop_config: dict[str, Any]) -> None:
    """The chain's work that needs the model, in order: the zero-shot row (when the driver has none), each
    planned task trained from the state the previous one ended with and then scored on every task seen so
    far (sharded over the ranks), and the export of the last state as a plain LoRA (when asked)."""
    import ray.train
    import ray.train.torch

    config = ChainConfig.model_validate(loop_config["config"])
    if not verbose():  # transformers' "Loading weights" bar, per rank and model load, would bury the progress lines
        transformers.utils.logging.disable_progress_bar()
    deepspeed = _init_deepspeed(config.scaling.use_gpu)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    config = settle_precision(config, device, rank)
    plan: list[dict[str, Any]] = loop_config["plan"]
    fit_id = loop_config["fit_id"]
    resume = _resume_point(plan, fit_id, rank, loop_config["previous_state"])
    state, progress, optimizer_state = resume.state, resume.progress, resume.optimizer_state

    if loop_config["zero_shot_tasks"] and not resume.this_fit:
        started = time.monotonic()
        scores = _score(config, None, loop_config["zero_shot_tasks"], rank, world_size, device)
        ray.train.report({"zero_shot": scores, "seconds": time.monotonic() - started}, checkpoint=None)

    for entry in plan[resume.position:]:
        task_index, label = entry["index"], entry["label"]
        torch.manual_seed(config.training.seed + task_index)

        # Model and strategy state: a restart after a worker failure resumes mid-task.
        model, strategy = build_training_model(config, state)
        if progress is not None:
            progress["resumed_at"] = progress.get("resumed_at", []) + [progress["steps"]]
            if rank == 0:
                moments = "with" if optimizer_state is not None else "without (none in the checkpoint)"
                console.info(f"[{label}] restarted after a failure: resuming at step {progress['steps']} "
                             f"{moments} the optimizer's moments")
        else:
            strategy.before_task(model, task_index)
            progress = {"fit_id": fit_id, "task_index": task_index, "task_done": False, "steps": 0, "losses": []}
            if rank == 0:
                console.info(f"[{label}] {len(entry['examples'])} training examples, {entry['steps']} steps on {world_size} workers")

        # DeepSpeed engine over the strategy's parameter groups (ProCL routers get their own lr).
        optimizer = torch.optim.AdamW(
            strategy.param_groups(model, config.training.lr), lr=config.training.lr, weight_decay=config.training.weight_decay
        )
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config),
                                          lr_scheduler=lr_schedule(config, entry["steps"], progress["steps"]))
        if optimizer_state is not None:
            load_optimizer_state(engine, optimizer_state)
        engine.train()

        # Training: micro-batches from this worker's shard of the task; hooks after each optimizer step.
        progress_line = _ProgressLine(label, entry["steps"], rank == 0)
        accumulation = config.training.gradient_accumulation
        micro_steps_done = progress["steps"] * accumulation  # a resumed worker skips what was trained
        collate = TrimPadding(labeled_logits_only=accepts_logits_to_keep(model))  # LM head + loss on answer positions only
        for micro_step, batch in enumerate(_micro_batches(entry["shards"][rank], config, collate, engine.device), start=1):
            if micro_step <= micro_steps_done:
                continue
            if progress["steps"] == entry["steps"]:  # training.max_steps reached
                break
            loss = engine(**batch).loss
            extra = strategy.extra_loss(model)
            engine.backward(loss if extra is None else loss + extra)
            engine.step()  # and the LR schedule, at each optimizer step
            progress["losses"].append(loss.item())
            if micro_step % accumulation:
                continue
            strategy.after_optimizer_step(model, engine)
            progress["steps"] += 1
            progress_line.update(progress["steps"], loss.item())
            every = config.training.checkpoint_every
            if every and progress["steps"] % every == 0:
                _report(strategy.state(model), progress, {"task_index": task_index, "step": progress["steps"], "loss": loss.item()}, engine)

        # Task end: fold/consolidate; the model is then scored on every task seen so far.
        strategy.after_task(model, task_index, entry["examples"], engine)
        state = strategy.state(model)  # collective under ZeRO-3: all ranks
        engine.destroy()
        del engine, model, optimizer
        trained = time.monotonic()
        scores = _score(config, state, entry["seen"], rank, world_size, device)
        progress["task_done"] = True
        final = {"task_index": task_index, "step": progress["steps"], "loss": progress["losses"][-1] if progress["losses"] else float("nan"),
                 "task_done": 1}
        # the driver times the whole task (start-up and data included) and takes training as the rest
        _report(state, progress, final, result={"scores": scores, "seconds": {"evaluate": time.monotonic() - trained}})
        progress, optimizer_state = None, None

    if loop_config["export"] and state is not None:
        _report_export(config, state, {"fit_id": fit_id, "task_index": plan[-1]["index"] if plan else None, "task_done": True}, rank)


def _report_export(config: ChainConfig, state: tuple[dict, dict], progress: dict[str, Any], rank: int) -> None:
    """Rank 0 writes `state`'s consolidated adapter as a plain peft LoRA into a checkpoint (`adapter/`), which
    the driver's callback publishes in the run folder; the other ranks report along."""
    import ray.train

    if rank != 0:
        ray.train.report({"exported": 1}, checkpoint=None)
        return
    model, _, strategy = load_trained(config, state)
    with tempfile.TemporaryDirectory() as folder:
        strategy.export(model, Path(folder) / ADAPTER)
        Path(folder, PROGRESS).write_text(json.dumps(progress))
        ray.train.report({"exported": 1}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def settle_precision(config: ChainConfig, device: torch.device, rank: int) -> ChainConfig:
    """The config with its precision settled for rank 0's device and shared with every rank: DeepSpeed
    needs all ranks in one precision, whatever hardware each landed on."""
    import torch.distributed as dist

    settled = [config.on_device(device).model_dump(mode="json") if rank == 0 else None]
    dist.broadcast_object_list(settled, src=0)
    if rank == 0 and device.type != "cpu":  # a CPU chain's driver has said it already
        console.info(config.precision_note())
    return ChainConfig.model_validate(settled[0])


def _score(config: ChainConfig, state: tuple[dict, dict] | None, tasks: list, rank: int, world_size: int,
           device: torch.device) -> dict[str, dict[str, float]]:
    """{split: {task: score}} on `device`: each rank scores every `world_size`-th example of each split, the counts are summed."""
    import torch.distributed as dist

    model, tokenizer = model_to_score(config, state)
    model.to(device)
    counts = count_correct(model, tokenizer, tasks, config, rank, world_size)
    del model
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, counts)
    return scores_from_counts(gathered)
