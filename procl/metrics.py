"""Continual-learning metrics over an accuracy matrix (formulas and conventions in docs/METRICS.md).

R has T + 1 rows and T columns: R[0][j] is the zero-shot score on task j before any training and
R[i][j] (i >= 1) the score on task j after training tasks 1..i. Tasks are 1-based in the formulas,
columns 0-based in code. Entries for tasks not yet seen (j > i) may be NaN: only R[i][j] with j <= i
enters AA, BWT and forgetting. A matrix with k + 1 rows (k < T) gives the metrics "so far", after task k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def as_matrix(matrix: Matrix) -> np.ndarray:
    """Validate and convert: rows = 1 (zero-shot) + tasks trained so far, columns = tasks of the stream."""
    r = np.asarray(matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] < 1:
        raise ValueError(f"accuracy matrix must be 2-D with a zero-shot row, got shape {r.shape}")
    if r.shape[0] - 1 > r.shape[1]:
        raise ValueError(f"accuracy matrix has {r.shape[0] - 1} trained rows but only {r.shape[1]} tasks")
    seen = [(i, j) for i in range(r.shape[0]) for j in range(r.shape[1]) if j < i or i == 0]
    if any(math.isnan(r[i, j]) for i, j in seen):
        raise ValueError("accuracy matrix has NaN where a score must exist (zero-shot row, or a task already trained)")
    return r


def _trained(r: np.ndarray) -> int:
    trained = r.shape[0] - 1
    if trained < 1:
        raise ValueError("the metric needs at least one trained row after the zero-shot row")
    return trained


def average_accuracy(matrix: Matrix) -> float:
    """AA_k = (1/k) sum_{j=1..k} R[k][j]: mean over the tasks seen so far, after the last one."""
    r = as_matrix(matrix)
    k = _trained(r)
    return float(r[k, :k].mean())


def average_incremental_accuracy(matrix: Matrix) -> float:
    """AIA_k = (1/k) sum_{i=1..k} AA_i."""
    r = as_matrix(matrix)
    return float(np.mean([average_accuracy(r[: i + 1]) for i in range(1, _trained(r) + 1)]))


def learning_accuracy(matrix: Matrix) -> float:
    """LA_k = (1/k) sum_{j=1..k} R[j][j]: each task's score right after training it (plasticity, before any forgetting).

    AA_k = LA_k + BWT_k (k - 1) / k: a method can trail on AA by learning less or by losing more later.
    """
    r = as_matrix(matrix)
    k = _trained(r)
    return float(np.mean([r[j, j - 1] for j in range(1, k + 1)]))


def backward_transfer(matrix: Matrix) -> float:
    """BWT_k = (1/(k-1)) sum_{j=1..k-1} (R[k][j] - R[j][j]); 0 when k = 1. Negative means forgetting."""
    r = as_matrix(matrix)
    k = _trained(r)
    if k == 1:
        return 0.0
    return float(np.mean([r[k, j - 1] - r[j, j - 1] for j in range(1, k)]))


def forgetting(matrix: Matrix) -> float:
    """F_k = (1/(k-1)) sum_{j=1..k-1} max_{j <= i <= k-1} (R[i][j] - R[k][j]); 0 when k = 1."""
    r = as_matrix(matrix)
    k = _trained(r)
    if k == 1:
        return 0.0
    return float(np.mean([max(r[i, j - 1] for i in range(j, k)) - r[k, j - 1] for j in range(1, k)]))


def forgetting_per_task(matrix: Matrix) -> list[float]:
    """f_j = max_{j <= i <= k-1} R[i][j] - R[k][j] for each task j < k (the per-task terms of F_k)."""
    r = as_matrix(matrix)
    k = _trained(r)
    return [float(max(r[i, j - 1] for i in range(j, k)) - r[k, j - 1]) for j in range(1, k)]


def forward_transfer(matrix: Matrix) -> float:
    """FWT_k = (1/(k-1)) sum_{j=2..k} (R[j-1][j] - R[0][j]): a task's score just before training it vs zero-shot.

    NaN when no R[j-1][j] was measured (the chain did not score tasks ahead of training them).
    """
    r = as_matrix(matrix)
    k = _trained(r)
    gains = [r[j - 1, j - 1] - r[0, j - 1] for j in range(2, k + 1)]
    gains = [g for g in gains if not math.isnan(g)]  # a task not scored before it was trained has no term
    return float(np.mean(gains)) if gains else math.nan


def summary(matrix: Matrix) -> dict[str, float]:
    """All scalar metrics after the last trained row."""
    return {
        "average_accuracy": average_accuracy(matrix),
        "average_incremental_accuracy": average_incremental_accuracy(matrix),
        "learning_accuracy": learning_accuracy(matrix),
        "backward_transfer": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
        "forward_transfer": forward_transfer(matrix),
    }


def paired_bootstrap_interval(
    differences: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences (method − baseline, one per chain run by both)
    and its percentile bootstrap interval, resampling the chains with replacement."""
    values = np.asarray(differences, dtype=float)
    if values.size == 0:
        raise ValueError("paired_bootstrap_interval needs at least one paired difference")
    draws = np.random.default_rng(seed).choice(values, size=(resamples, values.size), replace=True).mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return float(values.mean()), float(low), float(high)
