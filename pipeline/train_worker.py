"""The Ray Train worker loop of the chain: the zero-shot row, then task after task DeepSpeed ZeRO training
through the strategy hooks and scoring of every task seen so far, then the export, in one worker group
for the whole chain (the driver holds no model).

Reads top to bottom like Ray's DeepSpeed fine-tuning example. The same code runs on this CPU
machine (gloo) and on a multi-node GPU cluster (nccl): only `scaling.use_gpu` differs. One worker
group trains every task (a new one per task cost ~12 s of process start-up and imports each time,
benchmarks/pipeline_overhead.py). Each worker loads the base model once, on its device; each task
attaches the strategy's adapters to it at the state the chain reached, trains them in a DeepSpeed engine
of its own, scores the same model, and detaches them (peft's `unload`). No second copy is loaded.

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
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from pipeline.config import ChainConfig
from pipeline.memory import WorkerMemory, model_copy_mib, peak_resident_mib, release_freed_memory, resident_mib
from pipeline.preprocess import TrainingCollate
from pipeline.ray_workers import verbose
from pipeline.runtime import (SavedOptimizerState, deepspeed_config, inference_engine, init_deepspeed, largest_memory,
                              load_base_model, load_optimizer_state, lr_schedule, read_optimizer_state, restore_masters,
                              save_optimizer_state, score, settle_precision, train_steps)
from pipeline.scoring import attach_strategy
from pipeline.storage import read_state_at
from pipeline.task_results import ADAPTER, PROGRESS, RESULT, STATE
from procl.checkpoint import read_state, write_state

# Progress goes through logging, not print: Ray Train's workers turn print() into a log record *and* a
# print, so every progress line reached the driver's console twice.
console = logging.getLogger(__name__)



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
    optimizer_state: SavedOptimizerState | None
    this_fit: bool  # the checkpoint is this fit's: what it reported before (the zero-shot row) is not repeated


def _resume_point(plan: list[dict[str, Any]], fit_id: str, rank: int, previous_state: str | None) -> ResumePoint:
    """Where this (re)started worker group picks up.

    A checkpoint of this fit is trusted whole: after a task's end the next task starts, mid-task the task
    resumes, after the export nothing is left. One of an earlier fit of the chain (a driver killed and the
    chain re-submitted) is used only mid-way through the first planned task: had that fit finished the
    task, its results would have reached the driver's manifest, and the task would not be planned again,
    so they were lost and it is trained again. Otherwise the plan starts from `previous_state` (a run folder's
    checkpoint, a path or URI; None: the first task of the chain).
    """
    import ray.train

    def from_previous_state(this_fit: bool = False) -> ResumePoint:
        state = read_state_at(previous_state) if previous_state is not None else None  # a download from object storage
        return ResumePoint(0, state, None, None, this_fit)

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


def task_dataset(task_index: int) -> str:
    """The name of task `task_index`'s training rows among the trainer's datasets."""
    return f"task_{task_index}"


def task_shard(task_index: int):
    """This worker's shard of task `task_index`'s training rows (Ray Train's DataIterator over the streamed dataset)."""
    import ray.train

    return ray.train.get_dataset_shard(task_dataset(task_index))


def _micro_batches(shard, config: ChainConfig, task_index: int, collate: TrainingCollate, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's micro-batches of the task, epoch after epoch, each epoch in its own seeded order: the same on
    every run (a task resumed mid-way skips exactly the batches it trained on)."""
    for epoch in range(config.training.epochs):
        seed = int(np.random.SeedSequence([config.training.seed, task_index, epoch]).generate_state(1)[0])
        yield from shard.iter_torch_batches(batch_size=config.training.batch_size, collate_fn=collate, device=device,
                                            local_shuffle_buffer_size=config.training.shuffle_buffer or None,
                                            local_shuffle_seed=seed)


def train_chain(loop_config: dict[str, Any]) -> None:
    """The chain's work that needs the model, in order: the zero-shot row (when the driver has none), each
    planned task trained from the state the previous one ended with and then scored on every task seen so
    far (sharded over the ranks), and the export of the last state as a plain LoRA (when asked)."""
    import ray.train
    import ray.train.torch

    config = ChainConfig.model_validate(loop_config["config"])
    if not verbose():  # transformers' "Loading weights" bar, per rank and model load, would bury the progress lines
        transformers.utils.logging.disable_progress_bar()
    deepspeed = init_deepspeed(config.scaling.use_gpu)
    before_models_mib = resident_mib()  # imports done, no model loaded yet
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    config = settle_precision(config, device, rank)
    plan: list[dict[str, Any]] = loop_config["plan"]
    fit_id = loop_config["fit_id"]
    resume = _resume_point(plan, fit_id, rank, loop_config["previous_state"])
    state, progress, optimizer_state = resume.state, resume.progress, resume.optimizer_state

    # The base model: loaded once for the chain, on this worker's device; no other copy is ever loaded.
    base_model, tokenizer = load_base_model(config, device)
    copy_mib = model_copy_mib(base_model.parameters())

    if loop_config["zero_shot_tasks"] and not resume.this_fit:
        started = time.monotonic()
        with inference_engine(config, base_model):
            scores = score(config, base_model, tokenizer, loop_config["zero_shot_tasks"], rank, world_size)
        release_freed_memory()
        ray.train.report({"zero_shot": scores, "seconds": time.monotonic() - started}, checkpoint=None)

    for entry in plan[resume.position:]:
        task_index, label = entry["index"], entry["label"]

        # The strategy's adapters onto the base model, at the state the chain reached; a restart after a
        # worker failure resumes mid-task.
        model, strategy = attach_strategy(config, base_model, state)
        torch.manual_seed(config.training.seed + task_index)  # the task's own random stream (ProCL's router keys)
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
        if progress["steps"]:  # resumed mid-task: the fp32 masters and AdamW moments where the task was stopped
            restore_masters(engine, model, state[0])
            if optimizer_state is not None:
                load_optimizer_state(engine, optimizer_state)
        engine.train()

        # Training: micro-batches from this worker's shard of the task; hooks after each optimizer step.
        progress_line = _ProgressLine(label, entry["steps"], rank == 0)

        def after_step(loss: float) -> None:
            progress_line.update(progress["steps"], loss)
            every = config.training.checkpoint_every
            if every and progress["steps"] % every == 0:
                _report(strategy.state(model), progress, {"task_index": task_index, "step": progress["steps"], "loss": loss}, engine)

        collate = TrainingCollate.for_training(model, config.training)  # LM head + loss on answer positions only
        train_steps(engine, model, strategy, _micro_batches(task_shard(task_index), config, task_index, collate, engine.device), progress,
                    entry["steps"], config.training.gradient_accumulation, after_step)

        # Task end: fold/consolidate; the same model then scores every task seen so far (in its engine, whose
        # hooks gather the weights under ZeRO-3), and lets go of its adapters.
        strategy.after_task(model, task_index, entry["examples"], engine)
        state = strategy.state(model)  # collective under ZeRO-3: all ranks
        trained = time.monotonic()
        scores = score(config, model, tokenizer, entry["seen"], rank, world_size)
        engine.destroy()
        engine = optimizer = None
        base_model = model.unload()
        release_freed_memory()  # the task's training and scoring memory, before the next task allocates its own
        progress["task_done"] = True
        final = {"task_index": task_index, "step": progress["steps"], "loss": progress["losses"][-1] if progress["losses"] else float("nan"),
                 "task_done": 1}
        # the driver times the whole task (start-up and data included) and takes training as the rest
        memory = largest_memory(WorkerMemory(before_models_mib, peak_resident_mib(), copy_mib), world_size)
        _report(state, progress, final, result={"scores": scores, "seconds": {"evaluate": time.monotonic() - trained},
                                                "memory": memory.as_dict()})
        progress, optimizer_state = None, None

    if loop_config["export"] and state is not None:
        _report_export(config, base_model, state, {"fit_id": fit_id, "task_index": plan[-1]["index"] if plan else None, "task_done": True}, rank)


def _report_export(config: ChainConfig, base_model, state: tuple[dict, dict], progress: dict[str, Any], rank: int) -> None:
    """Rank 0 writes `state`'s consolidated adapter as a plain peft LoRA into a checkpoint (`adapter/`), which
    the driver's callback publishes in the run folder; the other ranks report along."""
    import ray.train

    if rank != 0:
        ray.train.report({"exported": 1}, checkpoint=None)
        return
    model, strategy = attach_strategy(config, base_model, state)
    with tempfile.TemporaryDirectory() as folder:
        strategy.export(model, Path(folder) / ADAPTER)
        Path(folder, PROGRESS).write_text(json.dumps(progress))
        ray.train.report({"exported": 1}, checkpoint=ray.train.Checkpoint.from_directory(folder))
    model.unload()


