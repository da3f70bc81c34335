"""The chain's checkpoint layout, and the Ray Train callback that hands each finished task to the driver.

A worker's checkpoint folder holds `state/` (procl.checkpoint: adapter + strategy state), `progress.json`
(the task, steps done, training losses), `optimizer/` in in-task checkpoints, and `result.json` (the
task's scores and timings) in the one that ends a task. Kept apart from the worker loop so that Ray
Train's controller, which runs the callback, does not import torch and the model code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ray.train import UserCallback

from procl.atomic import atomic_directory

STATE = "state"
PROGRESS = "progress.json"
RESULT = "result.json"
OPTIMIZER = "optimizer"


class TaskResults(UserCallback):
    """Runs in Ray Train's controller, on the driver's node: at each task's end it copies the task's state
    into the run folder (before Ray may prune that checkpoint) and puts the task's results on a queue the
    driver reads: {index, state_dir, losses, resumed_at, scores, seconds}."""

    def __init__(self, checkpoints_dir: Path, queue) -> None:
        self.checkpoints_dir, self.queue = checkpoints_dir, queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is None or not metrics[0].get("task_done"):
            return
        index = metrics[0]["task_index"]
        state_dir = self.checkpoints_dir / f"task_{index}"
        with checkpoint.as_directory() as folder, atomic_directory(state_dir) as staging:
            shutil.copytree(Path(folder) / STATE, staging, dirs_exist_ok=True)
            progress = json.loads((Path(folder) / PROGRESS).read_text())
            result = json.loads((Path(folder) / RESULT).read_text())
        self.queue.put({"index": index, "state_dir": str(state_dir), "losses": progress["losses"],
                        "resumed_at": progress.get("resumed_at", [])} | result)
