"""Continual-learning metrics from the task x task accuracy matrix (Lopez-Paz & Ranzato, 2017).

``R[i, j]`` is the test accuracy on task ``j`` after training on tasks ``0..i`` in order (T tasks;
in the class-incremental setting only ``j <= i`` is defined, the rest is NaN):

- average accuracy      ``ACC = (1/T) Σ_j R[T-1, j]``                     (after the last task)
- backward transfer     ``BWT = (1/(T-1)) Σ_{j<T-1} (R[T-1, j] − R[j, j])`` (< 0: forgetting)
- forgetting            ``F = (1/(T-1)) Σ_{j<T-1} (max_{i<T-1} R[i, j] − R[T-1, j])`` (Chaudhry
  et al., 2018: the drop from the best accuracy a task ever had)
- average incremental accuracy ``(1/T) Σ_i mean_{j<=i} R[i, j]`` (Rebuffi et al., 2017: the mean
  accuracy on everything seen so far, averaged over the stages)

With one task, BWT and forgetting are 0 (nothing came after it).
"""

from __future__ import annotations

import numpy as np


def _check(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square [T, T] with T >= 1, got {R.shape}")
    if np.isnan(np.tril(R)).any():
        raise ValueError("accuracy matrix has NaN at or below the diagonal: R[i, j<=i] is needed")
    return R


def average_accuracy(R: np.ndarray) -> float:
    R = _check(R)
    return float(R[-1].mean())


def backward_transfer(R: np.ndarray) -> float:
    R = _check(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def forgetting(R: np.ndarray) -> float:
    R = _check(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    best = np.array([R[j : T - 1, j].max() for j in range(T - 1)])
    return float(np.mean(best - R[-1, :-1]))


def average_incremental_accuracy(R: np.ndarray) -> float:
    R = _check(R)
    return float(np.mean([R[i, : i + 1].mean() for i in range(R.shape[0])]))


def continual_metrics(R: np.ndarray) -> dict[str, float]:
    """All four metrics of the module docstring, by name."""
    return {
        "average_accuracy": average_accuracy(R),
        "backward_transfer": backward_transfer(R),
        "forgetting": forgetting(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
    }
