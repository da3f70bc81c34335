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
words, and train / validation / test records `{"text", "target"}`. Sampling (pipeline.sampling, Ray
Data operations over the source, which never passes whole through the driver) is stratified and
seeded; validation is always disjoint from test (and both from train) by content hash, and overlap
found in a source's own splits is reported in `Task.report`. Sizes larger than the data are
capped with a warning (and the cap is reported). Tuning and checkpoint selection must only read
`validation`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Union

import pyarrow
import ray
import ray.data
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import sources
from pipeline.ray_workers import start_ray
from pipeline.sampling import Sample, SamplingError, blocks_for, sample_task
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
    """jsonl / json / csv / tsv / parquet read by Ray Data: one location (splits are made) or one per split.

    A location is a file, a folder (its files of the format) or a glob; a local path (relative to the
    stream file's folder) or a URI pyarrow opens (s3://bucket/prefix, gs://..., file:///...)."""

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


def default_verbalizer(label: str) -> str:
    """'FilmFestival' -> 'film festival', 'exchange_charge' -> 'exchange charge', 'Sports' -> 'sports'."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label).replace("_", " ")
    return re.sub(r"\s+", " ", words).strip().lower()


def _location(path: str, base: Path) -> str:
    """A stream's data path: a URI as written, a local path relative to the stream file's folder."""
    return path if "://" in path else str(base / path)


def _source_datasets(spec: TaskSpec, base: Path) -> tuple[dict[str, ray.data.Dataset], dict[str, tuple[str, str, str, str | None]]]:
    """The source's splits as Datasets of {text, label}, and for each file-read split what `diagnose` needs."""
    source = spec.source
    if isinstance(source, BundledSource):
        raw = sources.read_bundled(source.dataset)
        return {split: ray.data.from_items(rows, override_num_blocks=blocks_for(len(rows))) for split, rows in raw.items()}, {}
    if isinstance(source, FileSource):
        files = {"train": source.path} if source.path is not None else dict(source.splits)
        reads = {split: (_location(path, base), source.text_field, source.label_field, source.format) for split, path in files.items()}
    else:
        _, text_field, label_field = sources.FOLDER_LAYOUTS[source.type]
        reads = {split: (str(path), text_field, label_field, "json")
                 for split, path in sources.folder_split_files(base / source.path, source.type).items()}
    return {split: sources.read_files(*read) for split, read in reads.items()}, reads


def _sample(spec: TaskSpec, stream_seed: int, base: Path, where: str) -> Sample:
    """The task's samples; a source that cannot be read fails naming its file and record."""
    seed = str(spec.seed) if spec.seed is not None else f"{stream_seed}:{spec.name}"
    reads: dict[str, tuple[str, str, str, str | None]] = {}
    try:
        datasets, reads = _source_datasets(spec, base)
        return sample_task(datasets, spec.sizes.model_dump(), seed, stratified=spec.metric == "accuracy", classes=spec.classes,
                           max_chars=spec.max_input_chars, where=where)
    except sources.SourceError as error:
        raise StreamError(f"{where}: {getattr(error, 'cause', None) or error}") from error
    except SamplingError as error:
        raise StreamError(str(error)) from error
    except (ray.exceptions.RayTaskError, pyarrow.ArrowException) as error:
        for read in reads.values():  # which file, which line
            problem = sources.diagnose(*read)
            if problem:
                raise StreamError(f"{where}: {problem}") from error
        cause = getattr(error, "cause", None) or error
        raise StreamError(f"{where}: {', '.join(r[0] for r in reads.values()) or 'the source'} cannot be read "
                          f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from error


def build_task(spec: TaskSpec, stream_seed: int, base: Path) -> Task:
    """Read, filter, split disjointly, sample and verbalise one task."""
    where = f"task {spec.name!r}"
    sample = _sample(spec, stream_seed, base, where)
    splits, report = sample.splits, sample.report
    if isinstance(spec.source, FolderSource) and spec.source.type == "cl_benchmark":
        listed = sources.cl_benchmark_labels(base / spec.source.path)
        unknown = sorted(sample.labels - listed) if listed is not None else []
        if unknown:
            raise StreamError(f"{where}: {base / spec.source.path}: labels {unknown[:5]} are not in labels.json")

    train_labels = {r["label"] for r in splits["train"]}
    if spec.metric == "accuracy":
        for split in ("validation", "test"):
            unseen = sorted({r["label"] for r in splits[split]} - train_labels)
            if unseen:
                raise StreamError(f"{where}: {split} labels {unseen[:5]} never occur in the train split; raise sizes.train or filter classes")
        verbalizers = {label: default_verbalizer(label) for label in sorted(train_labels)} | {
            label: word for label, word in (spec.verbalizers or {}).items() if label in train_labels
        }
        unknown = sorted(set(spec.verbalizers or {}) - sample.labels)
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


def stream_order(path: str | Path, order: str | None = None) -> tuple[StreamSpec, str]:
    """The stream of `path` and the name of its order `order` (its first order when None)."""
    spec = parse_stream(path)
    order = order or next(iter(spec.orders))
    if order not in spec.orders:
        raise StreamError(f"{path}: unknown order {order!r}; the stream defines {sorted(spec.orders)}")
    return spec, order


def load_stream(path: str | Path, order: str | None = None) -> list[Task]:
    """The tasks of `order` (the first order when None), in that order.

    Sampling runs on Ray Data: on the Ray this process has joined, else the one of RAY_ADDRESS, else a
    fresh local one (`pipeline.chain.select_tasks` joins the chain's Ray first)."""
    path = Path(path)
    spec, order = stream_order(path, order)
    start_ray(os.environ.get("RAY_ADDRESS"))
    by_name = {task.name: task for task in spec.tasks}
    return [build_task(by_name[name], spec.seed, path.parent) for name in spec.orders[order]]


def check_answers_tokenize(tasks: list[Task], tokenizer) -> None:
    """Every answer word must give at least one token as a continuation (label scoring needs it)."""
    for task in tasks:
        for answer in task.answers:
            if not tokenizer(target_continuation(answer), add_special_tokens=False)["input_ids"]:
                raise StreamError(f"task {task.name!r}: answer word {answer!r} tokenizes to nothing")
