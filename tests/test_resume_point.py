"""Where a (re)started chain worker group picks up, for each kind of checkpoint Ray Train hands it.

The chain runs in one worker group; a restart gets the run's latest checkpoint, which may come from this
fit (a worker failed) or from an earlier fit of the chain (the driver was killed and the chain re-submitted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray.train
import torch

from pipeline import train_worker
from pipeline.task_results import ADAPTER, PROGRESS, STATE
from procl.checkpoint import write_state

PLAN = [{"index": 2}, {"index": 3}, {"index": 4}]  # the tasks the driver still needs


def checkpoint_of(folder: Path, task_index: int, done: bool, fit_id: str) -> ray.train.Checkpoint:
    folder.mkdir()
    write_state(folder / STATE, {"weight": torch.full((2,), float(task_index))}, {"task_index": task_index})
    progress = {"fit_id": fit_id, "task_index": task_index, "task_done": done, "steps": 0 if done else 3, "losses": [1.0]}
    (folder / PROGRESS).write_text(json.dumps(progress))
    return ray.train.Checkpoint.from_directory(str(folder))


@pytest.mark.parametrize(("task_index", "done", "fit_id", "position", "resumes_mid_task"), [
    (3, True, "this", 2, False),     # a worker failed after task 3's end: go on with task 4
    (3, False, "this", 1, True),     # ... mid-way through task 3: resume it
    (2, False, "earlier", 0, True),  # a re-submitted chain, killed mid-way through its first needed task
    (2, True, "earlier", 0, False),  # the earlier fit finished task 2 but the driver never got it: retrain
    (3, False, "earlier", 0, False), # the earlier fit got past tasks the driver never got: retrain from the start
    (1, True, "earlier", 0, False),  # a task the driver has recorded: start from the driver's previous state
])
def test_a_restarted_worker_group_picks_up_where_its_checkpoint_allows(tmp_path, monkeypatch, task_index, done, fit_id, position,
                                                                         resumes_mid_task):
    checkpoint = checkpoint_of(tmp_path / "checkpoint", task_index, done, fit_id)
    previous = write_state(tmp_path / "previous", {"weight": torch.full((2,), 1.0)}, {"task_index": 1})  # the driver's last recorded task
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)

    resume = train_worker._resume_point(PLAN, "this", rank=0, previous_state=str(previous))

    assert resume.position == position
    assert (resume.progress is not None) == resumes_mid_task
    assert resume.this_fit == (fit_id == "this")  # only a restart of this fit has reported the zero-shot row
    trusted = position > 0 or resumes_mid_task  # else: start the plan from the driver's previous state
    tensors, meta = resume.state
    expected = task_index if trusted else 1
    assert meta["task_index"] == expected and torch.equal(tensors["weight"], torch.full((2,), float(expected)))
    assert resume.optimizer_state is None  # the test's checkpoints hold no optimizer partition


def test_a_restart_after_this_fits_export_has_nothing_left(tmp_path, monkeypatch):
    folder = tmp_path / "export"
    (folder / ADAPTER).mkdir(parents=True)
    (folder / PROGRESS).write_text(json.dumps({"fit_id": "this", "task_index": 4, "task_done": True}))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(folder)))
    resume = train_worker._resume_point(PLAN, "this", rank=0, previous_state=None)
    assert (resume.position, resume.state, resume.this_fit) == (len(PLAN), None, True)  # no second export either


def test_no_checkpoint_starts_the_plan_from_the_previous_state(monkeypatch):
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert train_worker._resume_point(PLAN, "this", rank=0, previous_state=None) == train_worker.ResumePoint(0, None, None, None, False)
