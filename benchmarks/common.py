"""Pieces the step-level benchmarks share: their command line and one training step through the hooks."""

from __future__ import annotations

import argparse

import torch


def step_benchmark_parser(doc: str, batch: int) -> argparse.ArgumentParser:
    """--quick, --threads (default 1: steadier on a shared machine), --batch, --length."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--length", type=int, default=128)
    return parser


def strategy_step(model, strategy, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """One optimizer step as the worker loop takes it: loss + the strategy's extra loss, then its hook."""
    loss = model(input_ids=ids, labels=ids).loss
    extra = strategy.extra_loss(model)
    (loss if extra is None else loss + extra).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    strategy.after_optimizer_step(model)
    return loss.item()
