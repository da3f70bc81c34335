"""The chain manifest: what a run has finished, so a re-submitted chain skips it and continues.

`<run folder>/manifest.json` records the config fingerprint, the MLflow parent run, the zero-shot
scores, and per finished task its checkpoint folder (with the sha256 of its tensor file), its
score rows and its training losses. It is rewritten atomically after every change, and logged
to MLflow too. A checkpoint whose hash no longer matches is reported, never loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from pipeline.storage import RunFolder
from procl.checkpoint import META_FILE, TENSORS_FILE

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """The run folder's manifest or a checkpoint it lists is unusable; the message says which and why."""


@dataclass
class TaskRecord:
    index: int
    name: str
    state_dir: str
    tensors_sha256: str
    test: dict[str, float]
    validation: dict[str, float]
    losses: list[float]
    mlflow_run_id: str | None = None
    # wall seconds of the task's phases: "task" (since the previous task's end, or training's start for the
    # first task the driver trained), "evaluate" (scoring the tasks seen so far), "train" (the rest)
    seconds: dict[str, float] = field(default_factory=dict)
    # optimizer steps at which training resumed after a failure (from an in-task checkpoint)
    resumed_at: list[int] = field(default_factory=list)
    # a training worker's host memory in MiB (pipeline.memory.WorkerMemory, the rank with the most model copies)
    memory: dict[str, float] = field(default_factory=dict)
    # when the driver recorded the task as finished (unix seconds): with seconds["task"], the task's span
    ended_at: float | None = None
    # the examples the task trained on (replay and multitask add earlier tasks' examples to its own)
    train_examples: int | None = None


@dataclass
class Manifest:
    fingerprint: str
    task_names: list[str]
    mlflow_run_id: str | None = None
    zero_shot: dict[str, dict[str, float]] | None = None
    zero_shot_seconds: float | None = None
    tasks: list[TaskRecord] = field(default_factory=list)
    adapter_dir: str | None = None

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def open(cls, run_folder: RunFolder, fingerprint: str, task_names: list[str]) -> "Manifest":
        """The run folder's manifest, or a new one; refuses a folder that holds a different chain."""
        path = run_folder / MANIFEST
        if not path.exists():
            return cls(fingerprint, task_names)
        try:
            data = json.loads(path.read_text())
            manifest = cls(**{k: v for k, v in data.items() if k != "tasks"}, tasks=[TaskRecord(**t) for t in data["tasks"]])
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            raise ManifestError(f"{path} is not a readable chain manifest ({error}); move the run folder aside to start over") from error
        if manifest.fingerprint != fingerprint or manifest.task_names != task_names:
            raise ManifestError(
                f"{run_folder} holds a chain with different settings (model, stream, strategy or training changed); "
                "use another run_name to start a new chain, or restore the original config to resume"
            )
        for record in manifest.tasks:
            manifest.verify(record)
        return manifest

    def save(self, run_folder: RunFolder) -> RunFolder:
        """Replaced whole (pipeline.storage: a temporary file and a rename, or one PUT)."""
        path = run_folder / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=1, allow_nan=True))
        return path

    # -- progress ------------------------------------------------------------------------------
    def is_done(self, index: int) -> bool:
        return any(record.index == index for record in self.tasks)

    def task(self, index: int) -> TaskRecord:
        return next(record for record in self.tasks if record.index == index)

    def last_state(self) -> RunFolder | None:
        return RunFolder.at(self.tasks[-1].state_dir) if self.tasks else None

    def record(self, record: TaskRecord) -> None:
        self.tasks = [r for r in self.tasks if r.index != record.index] + [record]
        self.tasks.sort(key=lambda r: r.index)

    @staticmethod
    def verify(record: TaskRecord) -> None:
        folder = RunFolder.at(record.state_dir)
        for name in (TENSORS_FILE, META_FILE):
            if not (folder / name).is_file():
                raise ManifestError(f"checkpoint of task {record.index} ({record.name}) is missing {folder / name}")
        if (folder / TENSORS_FILE).sha256() != record.tensors_sha256:
            raise ManifestError(
                f"checkpoint of task {record.index} ({record.name}) at {folder} does not match its recorded sha256: "
                "truncated or altered; it will not be loaded"
            )

    def started_at(self) -> float | None:
        """When the chain started (unix seconds): its first task's start, less the zero-shot scoring before it;
        None before a task with timings is recorded."""
        first = self.tasks[0] if self.tasks else None
        if first is None or first.ended_at is None or "task" not in first.seconds:
            return None
        return first.ended_at - first.seconds["task"] - (self.zero_shot_seconds or 0.0)

    def evaluation_share(self) -> float:
        """Evaluation's share of the chain's wall time: zero-shot + per-task scoring over zero-shot + whole
        tasks (Ray start-up and the export, once per chain, are left out); NaN before timings exist."""
        timed = [record.seconds for record in self.tasks if "task" in record.seconds]
        if self.zero_shot_seconds is None or not timed:
            return math.nan
        evaluation = self.zero_shot_seconds + sum(seconds["evaluate"] for seconds in timed)
        return evaluation / (self.zero_shot_seconds + sum(seconds["task"] for seconds in timed))

    # -- the accuracy matrix -------------------------------------------------------------------
    def matrix(self, split: str = "test") -> list[list[float]]:
        """Zero-shot row, then one row per finished task; NaN for tasks not evaluated in that row."""
        rows = [[(self.zero_shot or {}).get(split, {}).get(name, math.nan) for name in self.task_names]]
        for record in self.tasks:
            scores = getattr(record, split)
            rows.append([scores.get(name, math.nan) for name in self.task_names])
        return rows
