"""Pieces the step-level benchmarks share: their command line and one training step through the hooks."""

from __future__ import annotations

import argparse

import torch

from pipeline.preprocess import keep_labeled_logits
from pipeline.tokenizing import IGNORE_INDEX


def step_benchmark_parser(doc: str, batch: int) -> argparse.ArgumentParser:
    """--quick, --threads (default 1: steadier on a shared machine), --batch, --length, --answer-tokens."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--answer-tokens", type=int, default=4, help="labelled tokens at the end of each row (0: every token)")
    return parser


def training_batch(vocab: int, batch: int, length: int, answer_tokens: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random token rows shaped like the pipeline's: the loss on the last `answer_tokens` (0: on every token), one
    example a row (`segments`, as `pipeline.preprocess.TrainingCollate` gives them)."""
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = ids.clone()
    if answer_tokens:
        labels[:, : length - answer_tokens] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "segments": torch.arange(batch)[:, None].expand(batch, length)}


def strategy_step(model, strategy, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], bf16: bool = False) -> float:
    """One optimizer step as the worker loop takes it (`pipeline.runtime.train_steps`: routing per example where
    the batch has `segments`, no KV cache, the LM head on the labelled positions only): loss + the strategy's
    extra loss, then its hook. bf16: under CPU autocast, as deepspeed.bf16 trains."""
    batch = keep_labeled_logits(dict(batch))
    with strategy.micro_batch(model, batch.pop("segments", None)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, use_cache=False).loss
        extra = strategy.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    strategy.after_optimizer_step(model)
    return loss.item()
