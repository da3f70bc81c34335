"""Shared fixtures: tiny randomly initialised causal LMs (no downloads) and a tiny training loop."""

from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
from collections.abc import Callable

import pytest
import torch
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 64


def free_port() -> int:
    """A loopback TCP port nobody listens on now (a gloo world's master, a Ray head, a dashboard)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What a launcher sets for one rank; torch.distributed and deepspeed.init_distributed read it."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}


def spawn_ranks(worker: Callable[..., None], *args, nprocs: int = 2) -> None:
    """Run `worker(rank, port, *args)` in `nprocs` spawned processes that form one world on `port`;
    raises if any rank raised.

    A rank leaves with os._exit once its worker has returned. DeepSpeed keeps its engines, and through
    them gloo process groups, alive to the end of the process, and tearing gloo's threads down during
    interpreter finalisation aborts the rank now and then ("terminate called without an active exception",
    SIGABRT) after every check has passed: about 1 run in 10 of the two-rank ZeRO tests.
    """
    mp.spawn(_run_rank, args=(worker, free_port(), args), nprocs=nprocs, join=True)


def _run_rank(rank: int, worker: Callable[..., None], port: int, args: tuple) -> None:
    worker(rank, port, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init_deepspeed_gloo():
    """Join the gloo world described by the environment (`rank_env`) through DeepSpeed, as a Ray Train
    worker does; returns the deepspeed module."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~64 s JIT build
    # a rank that misses a collective fails the test in minutes instead of hanging it for gloo's default 30
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(minutes=5))
    # DeepSpeed calls gc.collect() several times per engine; with pytest's and torch's objects moved
    # out of the collector's view those calls take milliseconds instead of ~0.3 s
    gc.freeze()
    return deepspeed


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, hidden 32, 4 heads (2 KV heads): q_proj 32->32, v_proj 32->16."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def batch(seed: int, size: int = 4, length: int = 12, offset: int = 0) -> torch.Tensor:
    """Token ids from a task-specific range so that different tasks look different to routing."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(offset, offset + VOCAB // 2, (size, length), generator=generator)


def train_steps(
    model, strategy, steps: int, seed: int, lr: float = 1e-2, offset: int = 0, batches: list | None = None, clip: float | None = None
) -> list[float]:
    """A minimal loop through the strategy hooks, as the pipeline's worker loop runs them (on `batches` when given)."""
    model.train()
    optimizer = torch.optim.AdamW(strategy.param_groups(model, lr), weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids = batch(seed * 1000 + step, offset=offset) if batches is None else batches[step]
        loss = model(input_ids=ids, labels=ids).loss
        extra = strategy.extra_loss(model)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
        optimizer.step()
        strategy.after_optimizer_step(model)
        losses.append(loss.item())
    model.eval()
    return losses


def run_task(model, strategy, task_index: int, steps: int = 4, lr: float = 1e-2) -> list[float]:
    strategy.before_task(model, task_index)
    losses = train_steps(model, strategy, steps, seed=task_index, lr=lr, offset=(task_index % 2) * (VOCAB // 2))
    strategy.after_task(model, task_index, [f"example-{task_index}-{i}" for i in range(8)])
    return losses


@pytest.fixture
def llama():
    return tiny_llama()


def rank_batch(task_index: int, rank: int, step: int) -> torch.Tensor:
    """The batch rank `rank` trains on at `step` of task `task_index` in the two-rank tests: each rank its own data."""
    return batch(seed=100 * task_index + 10 * rank + step, offset=rank * 32)


def one_process_procl_chain(procl_config, tasks: int, steps: int, clip: float | None = None) -> dict[str, torch.Tensor]:
    """The two-rank ProCL chains in one process, each step on both ranks' batches at once: what data
    parallelism computes (per-example routing, gradients averaged over equal-size batches). Routers are
    seeded with `torch.manual_seed(task)` before each task, as the two-rank workers do. Returns the LoRA weights."""
    from procl import LoraSettings, make_strategy

    strategy = make_strategy("procl", lora=LoraSettings(r=8), seed=0, procl=procl_config)
    model = strategy.build(tiny_llama())
    for task in range(tasks):
        torch.manual_seed(task)
        strategy.before_task(model, task)
        both = [torch.cat([rank_batch(task, rank, step) for rank in (0, 1)]) for step in range(steps)]
        train_steps(model, strategy, steps, seed=0, batches=both, clip=clip)
        strategy.after_task(model, task, [])
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
