"""The chain's checkpoint layout, and the Ray Train callback that hands the worker group's results to the
driver: the zero-shot row, each finished task, the exported adapter.

A worker's checkpoint folder holds `state/` (procl.checkpoint: adapter + strategy state), `progress.json`
(the task, steps done, training losses), `optimizer/` in in-task checkpoints, and `result.json` (the
task's scores and timings) in the one that ends a task; the export's holds `adapter/` (a plain peft
LoRA). Kept apart from the worker loop so that Ray Train's controller, which runs the callback, does not
import torch and the model code.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.train import UserCallback

from pipeline.storage import RunFolder

STATE = "state"
PROGRESS = "progress.json"
RESULT = "result.json"
ADAPTER = "adapter"


class TaskResults(UserCallback):
    """Runs in Ray Train's controller, on the driver's node. It puts each result on a queue the driver reads:
    {kind: "zero_shot", scores, seconds}; at each task's end {kind: "task", index, state_dir, losses,
    resumed_at, scores, seconds}, with the task's state published in the run folder first (before Ray may
    prune that checkpoint); {kind: "export", adapter_dir}, with the adapter published in the run folder.
    The checkpoint is read where Ray Train persisted it (a download from object storage)."""

    def __init__(self, run_folder: RunFolder, queue) -> None:
        self.run_folder, self.queue = run_folder, queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        reported = metrics[0]
        if "zero_shot" in reported:
            self.queue.put({"kind": "zero_shot", "scores": reported["zero_shot"], "seconds": reported["seconds"]})
        elif checkpoint is not None and reported.get("exported"):
            adapter_dir = self.run_folder / ADAPTER
            with checkpoint.as_directory() as folder:
                adapter_dir.publish(Path(folder) / ADAPTER)
            self.queue.put({"kind": "export", "adapter_dir": str(adapter_dir)})
        elif checkpoint is not None and reported.get("task_done"):
            index = reported["task_index"]
            state_dir = self.run_folder / "checkpoints" / f"task_{index}"
            with checkpoint.as_directory() as folder:
                state_dir.publish(Path(folder) / STATE)
                progress = json.loads((Path(folder) / PROGRESS).read_text())
                result = json.loads((Path(folder) / RESULT).read_text())
            self.queue.put({"kind": "task", "index": index, "state_dir": str(state_dir), "losses": progress["losses"],
                            "resumed_at": progress.get("resumed_at", [])} | result)
