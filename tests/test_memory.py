"""pipeline.memory: what a worker's memory figures mean, and handing freed heap memory back."""

from __future__ import annotations

import torch

from pipeline.memory import WorkerMemory, release_freed_memory, resident_mib


def test_release_freed_memory_hands_back_what_freed_tensors_left_in_the_heap():
    # earlier tests in this process may have left freed heap resident, which the chunks would reuse unseen
    release_freed_memory()
    before = resident_mib()
    chunks = [torch.ones(16 * 1024, dtype=torch.uint8) for _ in range(20_000)]  # 16 KiB each: glibc's heap, not mmap
    pin = torch.ones(16 * 1024, dtype=torch.uint8)  # above them, so the heap cannot simply shrink from its top
    held = resident_mib() - before
    assert held > 250  # 312 MiB allocated
    del chunks
    assert resident_mib() - before > 0.8 * held  # freed, still resident: glibc keeps it for reuse
    release_freed_memory()
    assert resident_mib() - before < 0.2 * held
    del pin


def test_models_over_copy_counts_the_peak_above_the_memory_before_any_model():
    memory = WorkerMemory(before_models_mib=500.0, peak_mib=1012.0, model_copy_mib=256.0)
    assert memory.models_over_copy() == 2.0
    assert memory.as_dict() == {"before_models_mib": 500.0, "peak_mib": 1012.0, "model_copy_mib": 256.0, "models_over_copy": 2.0}
