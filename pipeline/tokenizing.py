"""Tokenising a task's records into training rows: the one function the Ray Data pipeline, the bare benchmark
loop and the GPU check share.

Light on purpose: Ray Data's split coordinator (one per task's dataset, `pipeline.preprocess`) unpickles the
map function and its arguments before it starts streaming, so this module and `TokenizerLoader` import
neither torch nor transformers until a tokenizer is loaded, in the tokenising task itself. With them, every
task's first batch waited ~4.7 s longer and each coordinator held ~350 MiB more (benchmarks/README.md,
pipeline_overhead).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.prompts import ANSWER_CUE

IGNORE_INDEX = -100  # positions the loss skips (torch cross-entropy's default ignore_index)


@dataclass(frozen=True)
class TokenizerLoader:
    """A tokenizer factory that pickles as its model spec's JSON: `pipeline.models.load_tokenizer` of that spec.
    Equal specs make equal (hashable) loaders, so a worker's tasks of one chain share one loaded tokenizer."""

    spec_json: str

    @classmethod
    def of(cls, spec) -> "TokenizerLoader":
        """`spec`: a `pipeline.models.ModelSpec`."""
        return cls(spec.model_dump_json())

    def __call__(self):
        from pipeline.models import ModelSpec, load_tokenizer

        return load_tokenizer(ModelSpec.model_validate_json(self.spec_json))


def build_training_row(
    prompt_ids: list[int], target_ids: list[int], max_length: int, pad_id: int, mask_prompt: bool, cue_ids: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, attention_mask, labels) padded to max_length.

    A too-long prompt loses tokens from its middle (the input text), never its instruction head or
    its answer cue, and never the target.
    """
    room = max_length - len(target_ids)
    if room <= len(cue_ids):
        raise ValueError(f"max_length={max_length} leaves no room for a prompt before a {len(target_ids)}-token target")
    if len(prompt_ids) > room:
        tail = len(cue_ids)
        prompt_ids = prompt_ids[: room - tail] + prompt_ids[-tail:]
    ids = prompt_ids + target_ids
    labels = ([IGNORE_INDEX] * len(prompt_ids) if mask_prompt else list(prompt_ids)) + target_ids
    padding = max_length - len(ids)
    return ids + [pad_id] * padding, [1] * len(ids) + [0] * padding, labels + [IGNORE_INDEX] * padding


class TokenizeBatch:
    """{"prompt", "continuation"} columns -> input_ids / attention_mask / labels, with its tokenizer loaded once.

    `mask_prompt=False` trains on the whole sequence, as the reference code did.
    """

    def __init__(self, tokenizer_factory: Callable[[], Any], max_length: int, mask_prompt: bool = True) -> None:
        self.tokenizer = tokenizer_factory()
        self.max_length, self.mask_prompt = max_length, mask_prompt
        self.pad_id = self.tokenizer.pad_token_id
        self.eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        self.cue_ids = self.tokenizer("\n" + ANSWER_CUE, add_special_tokens=False)["input_ids"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = self.tokenizer(list(batch["prompt"]))["input_ids"]
        targets = self.tokenizer(list(batch["continuation"]), add_special_tokens=False)["input_ids"]
        rows = [
            build_training_row(p, t + self.eos, self.max_length, self.pad_id, self.mask_prompt, self.cue_ids)
            for p, t in zip(prompts, targets)
        ]
        ids, mask, labels = (np.asarray(column, dtype=np.int64) for column in zip(*rows))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokenize_rows(batch: dict[str, np.ndarray], tokenizer_factory: Callable[[], Any], max_length: int,
                  mask_prompt: bool) -> dict[str, np.ndarray]:
    """map_batches function: `TokenizeBatch` over one batch, its tokenizer shared by the task's batches."""
    return _task_tokenizer(tokenizer_factory, max_length, mask_prompt)(batch)


@functools.lru_cache(maxsize=1)
def _task_tokenizer(tokenizer_factory: Callable[[], Any], max_length: int, mask_prompt: bool) -> TokenizeBatch:
    # A Ray task deserializes its arguments once, so every batch of the task passes the same factory
    # object and the tokenizer loads once per task (per worker process, for equal TokenizerLoaders). The
    # cache holds that object, so its id is never reused by another factory while cached.
    return TokenizeBatch(tokenizer_factory, max_length, mask_prompt)
