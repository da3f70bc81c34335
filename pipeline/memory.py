"""How much host memory a worker's models take: its resident memory before the first model load, its peak
since, and the size of one copy of the model, so that a chain records how many model copies a worker held
at once (benchmarks/worker_memory.py reads it). Importable without Ray (the worker runtime uses it).
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

MIB = 1024 * 1024


def resident_mib() -> float:
    """This process's resident memory now (Linux: /proc/self/statm counts pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is another."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand back to the OS what freed tensors left in glibc's heaps (malloc_trim). glibc keeps a phase's freed
    memory for reuse, but the next phase allocates other sizes and grows beside it: a worker's scoring left
    300-400 MiB resident beside a 257 MiB model (benchmarks/worker_memory.py). Nothing where the C library is
    not glibc, and nothing for GPU memory (torch's CUDA allocator reuses its own cache)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_resident_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_copy_mib(parameters: Iterable[torch.nn.Parameter]) -> float:
    """One copy of these weights as they are held now (dtype included; tied weights counted once; a ZeRO-3
    partitioned parameter by its whole size)."""
    unique = {id(p): p for p in parameters}.values()
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in unique) / MIB


@dataclass(frozen=True)
class WorkerMemory:
    """A worker's memory in MiB: before its first model load (imports done), its peak since, one model copy."""

    before_models_mib: float
    peak_mib: float
    model_copy_mib: float

    def models_over_copy(self) -> float:
        """What the worker's models took at their peak, in model copies (peak - before) / one copy."""
        return (self.peak_mib - self.before_models_mib) / self.model_copy_mib

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"models_over_copy": self.models_over_copy()}
