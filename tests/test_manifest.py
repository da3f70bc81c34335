"""The chain manifest's bookkeeping: timings and the evaluation share, and manifests written before timings existed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.manifest import Manifest, TaskRecord
from pipeline.storage import RunFolder
from procl.checkpoint import TENSORS_FILE, sha256_file, write_state


def _record(index: int, state_dir, seconds: dict[str, float]) -> TaskRecord:
    return TaskRecord(index, f"t{index}", str(state_dir), sha256_file(state_dir / TENSORS_FILE), {}, {}, [1.0], seconds=seconds)


def test_evaluation_share_counts_zero_shot_and_every_tasks_scoring(tmp_path):
    state = write_state(tmp_path / "state", {"w": torch.zeros(2)}, {"strategy": "seq_lora"})
    manifest = Manifest("f", ["t0", "t1"])
    assert math.isnan(manifest.evaluation_share())
    manifest.zero_shot_seconds = 10.0
    manifest.record(_record(0, state, {"train": 60.0, "evaluate": 20.0, "task": 90.0}))
    manifest.record(_record(1, state, {"train": 50.0, "evaluate": 30.0, "task": 100.0}))
    assert manifest.evaluation_share() == pytest.approx((10 + 20 + 30) / (10 + 90 + 100))


def test_a_manifest_written_before_timings_existed_still_resumes(tmp_path):
    state = write_state(tmp_path / "state", {"w": torch.zeros(2)}, {"strategy": "seq_lora"})
    old = {"fingerprint": "f", "task_names": ["t0", "t1"], "mlflow_run_id": None, "zero_shot": {"test": {}, "validation": {}},
           "tasks": [{"index": 0, "name": "t0", "state_dir": str(state), "tensors_sha256": sha256_file(state / TENSORS_FILE),
                      "test": {"t0": 0.5}, "validation": {"t0": 0.5}, "losses": [1.0], "mlflow_run_id": None}],
           "adapter_dir": None}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    manifest = Manifest.open(RunFolder.at(tmp_path), "f", ["t0", "t1"])
    assert manifest.is_done(0) and not manifest.is_done(1)
    assert manifest.task(0).seconds == {} and math.isnan(manifest.evaluation_share())
