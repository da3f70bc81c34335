"""Ray Data preprocessing: a task's records -> tokenized, loss-masked training rows for Ray Train.

    datasets = {"train": tokenized_dataset(task, tokenizer_factory, max_length=256)}
    TorchTrainer(..., datasets=datasets)
    # in each worker:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=8, collate_fn=TrainingCollate()): ...

Rows are padded to `max_length` inside `map_batches` (fixed shapes keep Ray Data's tensor columns
simple) and `TrainingCollate` cuts each batch back to its longest sequence (or packs its examples into
fewer rows), so no step computes on more padding than its batch needs. The dataset streams into the workers as they train: the chain
keeps `scaling.ingest_cpus` beside its training workers for it (`pipeline.chain`), so it never
waits for a CPU the workers hold.

Tokenisation (`pipeline.tokenizing`, kept light for Ray Data's split coordinators) runs as Ray tasks, one
per block of up to `ROWS_PER_BLOCK` rows, each loading the tokenizer once. Tasks run in Ray's pooled worker processes, which a chain keeps warm between tasks;
an actor pool started a fresh process per dataset, i.e. per task of a chain (6.6 s per task for the
demo's 48 rows, against 0.7-1.3 s as tasks; benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.config import TOKENIZE_CPUS
from pipeline.tokenizing import IGNORE_INDEX, tokenize_rows

ROWS_PER_BLOCK = 4096  # rows per tokenisation task: a tokenizer load (~0.3 s) is small against tokenising them


def tokenized_dataset(
    training_texts: list[tuple[str, str]],
    tokenizer_factory: Callable[[], Any],
    max_length: int,
    mask_prompt: bool = True,
    batch_size: int = 64,
) -> ray.data.Dataset:
    """A Ray dataset of training rows from (prompt, continuation) pairs (lazy: tokenised as it is read)."""
    if not training_texts:
        raise ValueError("no training examples to preprocess")
    items = [{"prompt": prompt, "continuation": continuation} for prompt, continuation in training_texts]
    dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / ROWS_PER_BLOCK)).map_batches(
        tokenize_rows,
        fn_args=(tokenizer_factory, max_length, mask_prompt),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=TOKENIZE_CPUS,
    )
    return dataset


def ingest_config(ingest_cpus: float):
    """Ray Train's DataConfig for training datasets: each streamed within `ingest_cpus` (CPUs kept beside the
    training workers), in a fixed order, so that the workers' shards, hence a resumed task's batches, are the
    same on every run."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(resource_limits=ExecutionResources(cpu=ingest_cpus), preserve_order=True))


def keep_labeled_logits(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add transformers' `logits_to_keep` and `shift_labels`: the LM head and the loss run only on the
    positions that predict a labelled token.

    With the prompt masked, an answer is a few tokens of a 50-200 token row, yet the vocabulary
    projection and its fp32 cross-entropy ran on every position: on SmolLM2 (49k vocabulary) about a
    fifth of a training step (benchmarks/precision.py). The loss is the same mean over the labelled
    tokens; nothing else in a forward pass changes.
    """
    labels = batch["labels"]
    predicted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # the token each position predicts
    keep = predicted != IGNORE_INDEX
    return {**batch, "logits_to_keep": keep, "shift_labels": predicted[keep]}


def example_segments(attention_mask: np.ndarray) -> np.ndarray:
    """(B, T) -> the example each token belongs to: row b's tokens are example b, padding -1."""
    return np.where(attention_mask.astype(bool), np.arange(len(attention_mask))[:, None], -1)


def pack_examples(batch: dict[str, np.ndarray], max_length: int) -> dict[str, np.ndarray]:
    """A micro-batch's right-padded rows packed, first fit by decreasing length, into as few rows of at most
    `max_length` tokens as hold them.

    Each example keeps its own positions (position_ids restart at 0) and its tokens' `segments` index (padding
    -1); the first label of each is ignored, so no example learns to predict the start of the next. With no
    attention_mask, transformers reads the packing from position_ids and lets no token attend across examples:
    the loss is the same as unpacked, on the same labelled tokens.
    """
    lengths = batch["attention_mask"].sum(axis=1)
    rows: list[list[int]] = []  # example indices per packed row
    room: list[int] = []
    for example in np.argsort(-lengths, kind="stable"):
        fits = next((r for r, free in enumerate(room) if free >= lengths[example]), None)
        if fits is None:
            rows.append([])
            room.append(max_length)
            fits = len(rows) - 1
        rows[fits].append(int(example))
        room[fits] -= int(lengths[example])
    width = max_length - min(room)
    packed = {"input_ids": np.zeros((len(rows), width), dtype=np.int64),
              "labels": np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64),
              "position_ids": np.zeros((len(rows), width), dtype=np.int64),
              "segments": np.full((len(rows), width), -1, dtype=np.int64)}
    segment = 0
    for r, examples in enumerate(rows):
        at = 0
        for example in sorted(examples):  # in the micro-batch's order within a row
            n = int(lengths[example])
            packed["input_ids"][r, at:at + n] = batch["input_ids"][example, :n]
            packed["labels"][r, at + 1:at + n] = batch["labels"][example, 1:n]
            packed["position_ids"][r, at:at + n] = np.arange(n)
            packed["segments"][r, at:at + n] = segment
            segment, at = segment + 1, at + n
    return packed


class TrainingCollate(NumpyBatchCollateFn):
    """collate_fn for iter_torch_batches: a micro-batch of tokenized rows as model inputs plus `segments`
    (which example each token belongs to, -1 on padding: ProCL routes per example, `ContinualStrategy.micro_batch`).

    Rows are cut back to the micro-batch's longest, or with `pack_to` packed into rows of that many tokens
    (`pack_examples`), which spares the padding of short examples. labeled_logits_only: add
    `keep_labeled_logits`'s inputs (for a model whose forward takes `logits_to_keep`, see
    `pipeline.models.accepts_logits_to_keep`). Ray moves the returned tensors to the `device` given to
    iter_torch_batches.
    """

    def __init__(self, labeled_logits_only: bool = False, pack_to: int | None = None) -> None:
        super().__init__()
        self.labeled_logits_only, self.pack_to = labeled_logits_only, pack_to

    @classmethod
    def for_training(cls, model, training) -> "TrainingCollate":
        """As the workers train `model` under `training` (`TrainingSettings`): the LM head and loss on the answer
        positions where the model's forward takes logits_to_keep, packed into rows of max_length with `packing`."""
        from pipeline.models import accepts_logits_to_keep

        return cls(labeled_logits_only=accepts_logits_to_keep(model), pack_to=training.max_length if training.packing else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.pack_to:
            columns = pack_examples(batch, self.pack_to)
        else:
            longest = int(batch["attention_mask"].sum(axis=1).max())
            columns = {name: batch[name][:, :longest] for name in ("input_ids", "attention_mask", "labels")}
            columns["segments"] = example_segments(columns["attention_mask"])
        tensors = {name: torch.from_numpy(np.ascontiguousarray(column)) for name, column in columns.items()}
        return keep_labeled_logits(tensors) if self.labeled_logits_only else tensors


def count_tokens(dataset: ray.data.Dataset) -> int:
    """Non-padding tokens in a tokenized dataset (for throughput reports)."""
    return sum(int(batch["attention_mask"].sum()) for batch in dataset.iter_batches(batch_format="numpy", batch_size=256))
