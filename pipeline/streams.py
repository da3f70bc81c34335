"""Task streams: a YAML file of tasks and named orders, validated, turned into sampled, disjoint splits.

A stream file:

    name: standard
    seed: 0
    tasks:
      - name: yahoo
        source: {type: bundled, dataset: yahoo}       # or file / cl_benchmark / trace
        instruction: "What is the topic of this question?"
        verbalizers: {"Business & Finance": business}  # label -> answer word (default: the label)
        classes: 5                                     # keep the 5 most frequent classes
        sizes: {train: 200, validation: 50, test: 100}
    orders:
      order1: [dbpedia, amazon, yahoo, bbc]

`load_stream(path, order)` returns the tasks of one order as `Task`s: instruction, metric, answer
words, and train / validation / test records `{"text", "target"}`. Sampling is stratified and
seeded; validation is always disjoint from test (and both from train) by content hash, and overlap
found in a source's own splits is reported in `Task.report`. Sizes larger than the data are
capped with a warning (and the cap is reported). Tuning and checkpoint selection must only read
`validation`.
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import sources
from pipeline.prompts import format_prompt, target_continuation
from pipeline.validation import validation_problems, yaml_problem

SPLITS = ("train", "validation", "test")


class StreamError(ValueError):
    """A stream file or its data is invalid; the message names the file/field and what was expected."""


# -- schema --------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundledSource(_Strict):
    type: Literal["bundled"]
    dataset: str


class FileSource(_Strict):
    """Local jsonl / json / csv / tsv / parquet: one file (splits are made) or one file per split."""

    type: Literal["file"]
    path: str | None = None
    splits: dict[Literal["train", "validation", "test"], str] | None = None
    format: Literal["jsonl", "json", "csv", "tsv", "parquet"] | None = None
    text_field: str = "text"
    label_field: str = "label"

    @model_validator(mode="after")
    def _one_layout(self) -> "FileSource":
        if (self.path is None) == (self.splits is None):
            raise ValueError("give exactly one of 'path' (one file) or 'splits' (a file per split)")
        if self.splits is not None and "train" not in self.splits:
            raise ValueError("'splits' needs at least a 'train' file")
        return self


class FolderSource(_Strict):
    type: Literal["cl_benchmark", "trace"]
    path: str


Source = Annotated[Union[BundledSource, FileSource, FolderSource], Field(discriminator="type")]


class Sizes(_Strict):
    train: int = Field(gt=0)
    validation: int = Field(gt=0)
    test: int = Field(gt=0)


class TaskSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    source: Source
    instruction: str = ""
    metric: Literal["accuracy", "exact_match", "contains"] = "accuracy"
    verbalizers: dict[str, str] | None = None
    classes: int | None = Field(None, gt=1, description="keep only the N most frequent classes")
    sizes: Sizes
    max_input_chars: int | None = Field(None, gt=0, description="truncate each input text to this many characters")
    seed: int | None = None


class StreamSpec(_Strict):
    name: str
    seed: int = 0
    tasks: list[TaskSpec] = Field(min_length=1)
    orders: dict[str, list[str]] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_and_orders(self) -> "StreamSpec":
        names = [task.name for task in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate task names {duplicates}: each task needs its own name")
        for order, listed in self.orders.items():
            unknown = [n for n in listed if n not in names]
            if unknown:
                raise ValueError(f"order {order!r} lists unknown tasks {unknown}; tasks are {names}")
            if len(set(listed)) != len(listed) or not listed:
                raise ValueError(f"order {order!r} must list each task at most once and at least one task")
        return self


def parse_stream(path: str | Path) -> StreamSpec:
    """Read and validate a stream YAML; errors name the file and the field path."""
    path = Path(path)
    try:
        text = sources.read_text(path)
    except sources.SourceError as error:
        raise StreamError(f"stream file {error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise StreamError(f"{path}: not valid YAML ({yaml_problem(error)})") from error
    if not isinstance(data, dict):
        raise StreamError(f"{path}: expected a mapping with name, tasks and orders")
    try:
        return StreamSpec.model_validate(data)
    except ValidationError as error:
        raise StreamError(f"{path}: {validation_problems(error)}") from error


# -- building tasks --------------------------------------------------------------------------------


@dataclass
class Task:
    """One task of a chain, ready for preprocessing and evaluation."""

    name: str
    instruction: str
    metric: str
    answers: list[str]  # the label words of a classification task (empty for free-form answers)
    splits: dict[str, list[dict[str, str]]]  # split -> [{"text", "target"}]
    report: dict[str, object] = field(default_factory=dict)
    source: dict[str, object] = field(default_factory=dict)  # where the records came from: the stream's `source`

    def prompts(self, split: str) -> list[str]:
        return [format_prompt(self.instruction, r["text"]) for r in self.splits[split]]

    def targets(self, split: str) -> list[str]:
        return [r["target"] for r in self.splits[split]]

    def training_texts(self) -> list[tuple[str, str]]:
        """(prompt, continuation) pairs of the training split."""
        return [(format_prompt(self.instruction, r["text"]), target_continuation(r["target"])) for r in self.splits["train"]]


def content_hash(text: str) -> str:
    """Identity of an input for disjointness: case- and whitespace-insensitive."""
    return hashlib.sha1(re.sub(r"\s+", " ", text).strip().lower().encode("utf-8")).hexdigest()


def default_verbalizer(label: str) -> str:
    """'FilmFestival' -> 'film festival', 'exchange_charge' -> 'exchange charge', 'Sports' -> 'sports'."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label).replace("_", " ")
    return re.sub(r"\s+", " ", words).strip().lower()


def _stratified_sample(records: list[dict], size: int, rng: random.Random) -> list[dict]:
    """`size` records with class proportions kept (largest remainder), shuffled; all if fewer."""
    if size >= len(records):
        picked = list(records)
    else:
        by_label: dict[str, list[dict]] = defaultdict(list)
        for record in records:
            by_label[record["label"]].append(record)
        labels = sorted(by_label)
        exact = {label: size * len(by_label[label]) / len(records) for label in labels}
        counts = {label: int(exact[label]) for label in labels}
        for label in sorted(labels, key=lambda lb: (counts[lb] - exact[lb], lb))[: size - sum(counts.values())]:
            counts[label] += 1
        picked = [r for label in labels for r in rng.sample(by_label[label], counts[label])]
    rng.shuffle(picked)
    return picked


def _read_source(spec: TaskSpec, base: Path) -> sources.RawSplits:
    source = spec.source
    if isinstance(source, BundledSource):
        return sources.read_bundled(source.dataset)
    if isinstance(source, FileSource):
        if source.path is not None:
            return {"train": sources.read_table(base / source.path, source.text_field, source.label_field, source.format)}
        return {
            split: sources.read_table(base / path, source.text_field, source.label_field, source.format)
            for split, path in source.splits.items()
        }
    reader = sources.read_cl_benchmark if source.type == "cl_benchmark" else sources.read_trace
    return reader(base / source.path)


def _dedupe(records: list[dict]) -> list[dict]:
    seen: set[str] = set()
    unique = []
    for record in records:
        key = content_hash(record["text"])
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def build_task(spec: TaskSpec, stream_seed: int, base: Path) -> Task:
    """Read, filter, split disjointly, sample and verbalise one task."""
    where = f"task {spec.name!r}"
    try:
        raw = _read_source(spec, base)
    except sources.SourceError as error:
        raise StreamError(f"{where}: {error}") from error
    rng = random.Random(spec.seed if spec.seed is not None else f"{stream_seed}:{spec.name}")
    report: dict[str, object] = {}

    raw = {split: _dedupe(records) for split, records in raw.items()}
    if spec.max_input_chars:
        raw = {s: [r | {"text": r["text"][: spec.max_input_chars]} for r in rs] for s, rs in raw.items()}
    if spec.classes is not None:
        counts: dict[str, int] = defaultdict(int)
        for record in raw["train"]:
            counts[record["label"]] += 1
        kept = set(sorted(counts, key=lambda label: (-counts[label], label))[: spec.classes])
        raw = {s: [r for r in rs if r["label"] in kept] for s, rs in raw.items()}

    # Disjointness by content hash: test is fixed first, validation avoids test, train avoids both.
    test_pool = raw.get("test", [])
    validation_pool = raw.get("validation", [])
    train_pool = raw["train"]
    test_hashes = {content_hash(r["text"]) for r in test_pool}
    overlap = [r for r in validation_pool if content_hash(r["text"]) in test_hashes]
    if overlap:
        report["source_validation_test_overlap"] = len(overlap)
        warnings.warn(f"{where}: {len(overlap)} of the source's validation records are also in its test split; dropped from validation")
        validation_pool = [r for r in validation_pool if content_hash(r["text"]) not in test_hashes]
    held_out = test_hashes | {content_hash(r["text"]) for r in validation_pool}
    train_overlap = sum(content_hash(r["text"]) in held_out for r in train_pool)
    if train_overlap:
        report["source_train_heldout_overlap"] = train_overlap
    train_pool = [r for r in train_pool if content_hash(r["text"]) not in held_out]

    # Splits the source does not ship are carved from train (stratified, with the task's seed).
    sizes = spec.sizes
    if not test_pool:
        test_pool, train_pool = _carve(train_pool, sizes.test, rng)
        report["test_made_from"] = "train"
    if len(validation_pool) < sizes.validation:
        extra, train_pool = _carve(train_pool, sizes.validation - len(validation_pool), rng)
        validation_pool = validation_pool + extra
        report["validation_made_from"] = "train" if not raw.get("validation") else "source validation + train"

    splits = {}
    for split, pool in (("train", train_pool), ("validation", validation_pool), ("test", test_pool)):
        wanted = getattr(sizes, split)
        if wanted > len(pool):
            warnings.warn(f"{where}: sizes.{split}={wanted} is larger than the {len(pool)} records available; capped")
            report[f"{split}_capped_to"] = len(pool)
        splits[split] = _stratified_sample(pool, wanted, rng)
        if not splits[split]:
            raise StreamError(f"{where}: the {split} split is empty after filtering and sampling")

    train_labels = {r["label"] for r in splits["train"]}
    if spec.metric == "accuracy":
        for split in ("validation", "test"):
            unseen = sorted({r["label"] for r in splits[split]} - train_labels)
            if unseen:
                raise StreamError(f"{where}: {split} labels {unseen[:5]} never occur in the train split; raise sizes.train or filter classes")
        verbalizers = {label: default_verbalizer(label) for label in sorted(train_labels)} | {
            label: word for label, word in (spec.verbalizers or {}).items() if label in train_labels
        }
        all_labels = {r["label"] for records in raw.values() for r in records}
        unknown = sorted(set(spec.verbalizers or {}) - all_labels)
        if unknown and not spec.classes:
            raise StreamError(f"{where}: verbalizers name labels {unknown[:5]} that the data does not have")
        empty = sorted(label for label, word in verbalizers.items() if not word.strip())
        if empty:
            raise StreamError(f"{where}: verbalizers for {empty} are empty; every label needs an answer word")
        words = list(verbalizers.values())
        if len(set(words)) != len(words):
            raise StreamError(f"{where}: two labels share an answer word in {verbalizers}; answer words must differ")
        answers = [verbalizers[label] for label in sorted(train_labels)]
        mapped = {s: [{"text": r["text"], "target": verbalizers[r["label"]]} for r in rs] for s, rs in splits.items()}
    else:
        answers = []
        mapped = {s: [{"text": r["text"], "target": r["label"]} for r in rs] for s, rs in splits.items()}
    report["sizes"] = {s: len(rs) for s, rs in mapped.items()}
    return Task(spec.name, spec.instruction, spec.metric, answers, mapped, report, spec.source.model_dump(exclude_none=True))


def _carve(pool: list[dict], count: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Take a stratified sample of `count` records out of `pool`: (taken, rest)."""
    taken = _stratified_sample(pool, count, rng)
    taken_ids = {id(r) for r in taken}
    return taken, [r for r in pool if id(r) not in taken_ids]


def stream_order(path: str | Path, order: str | None = None) -> tuple[StreamSpec, str]:
    """The stream of `path` and the name of its order `order` (its first order when None)."""
    spec = parse_stream(path)
    order = order or next(iter(spec.orders))
    if order not in spec.orders:
        raise StreamError(f"{path}: unknown order {order!r}; the stream defines {sorted(spec.orders)}")
    return spec, order


def load_stream(path: str | Path, order: str | None = None) -> list[Task]:
    """The tasks of `order` (the first order when None), in that order."""
    path = Path(path)
    spec, order = stream_order(path, order)
    by_name = {task.name: task for task in spec.tasks}
    return [build_task(by_name[name], spec.seed, path.parent) for name in spec.orders[order]]


def check_answers_tokenize(tasks: list[Task], tokenizer) -> None:
    """Every answer word must give at least one token as a continuation (label scoring needs it)."""
    for task in tasks:
        for answer in task.answers:
            if not tokenizer(target_continuation(answer), add_special_tokens=False)["input_ids"]:
                raise StreamError(f"task {task.name!r}: answer word {answer!r} tokenizes to nothing")
