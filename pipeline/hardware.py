"""What the hardware a model runs on does natively, for the `auto` precision settings.

bf16 pays only where the hardware computes it natively: CUDA devices that support it, and CPUs with
AVX512-BF16 or AMX tiles. Elsewhere bf16 is emulated: on an AVX2-only CPU a SmolLM2 forward pass ran
6x slower in bf16 than in fp32 (docs/RESULTS.md), so `auto` picks fp32 there. The choice is read from
the CPU's flags, never guessed from the vendor. Importable without Ray (the worker runtime uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch


@dataclass(frozen=True)
class Bf16Support:
    """Whether `device` computes bf16 natively, and the evidence in a few words."""

    native: bool
    why: str


@cache
def _cpuinfo(field: str) -> str | None:
    """The value of `field` for the first CPU in /proc/cpuinfo (None where there is no such file or field)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (benchmarks record it: speed-ups depend on it)."""
    return _cpuinfo("model name") or "unknown CPU"


def _cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_bf16_features() -> list[str]:
    """The CPU's native bf16 features: AMX-BF16 and/or AVX512-BF16 (torch's own CPU probe, or /proc/cpuinfo)."""
    flags = _cpu_flags()
    features = []
    if torch.cpu._is_amx_tile_supported() or "amx_bf16" in flags:
        features.append("AMX-BF16")
    if torch.cpu._is_avx512_bf16_supported() or "avx512_bf16" in flags:
        features.append("AVX512-BF16")
    return features


def bf16_support(device: torch.device | str) -> Bf16Support:
    """Native bf16 on `device` ("cpu", "cuda", "cuda:1", ...)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Bf16Support(True, f"{name} supports bf16")
        return Bf16Support(False, f"{name} has no native bf16")
    if device.type == "cpu":
        features = cpu_bf16_features()
        capability = torch.backends.cpu.get_cpu_capability()
        if features:
            return Bf16Support(True, f"{cpu_name()} has {' and '.join(features)}")
        return Bf16Support(False, f"{cpu_name()} ({capability}) has neither AVX512-BF16 nor AMX: bf16 would be emulated, "
                                  "several times slower than fp32")
    return Bf16Support(False, f"{device.type}: native bf16 unknown")
