"""Intervals over questions: a percentile bootstrap of one model's accuracy, and of the paired
difference between two models scored on the same questions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_interval(
    values: Sequence[float], *, iters: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-question values (resampling questions)."""
    if iters < 1:
        raise ValueError("bootstrap needs at least one resample")
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    # Resample in chunks so that iters x n indices never sit in memory at once.
    chunk = max(1, 2_000_000 // len(values))
    means = np.concatenate([
        values[rng.integers(0, len(values), size=(min(chunk, iters - done), len(values)))].mean(1)
        for done in range(0, iters, chunk)
    ])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(correct_a: list[bool], correct_b: list[bool], *, iters: int = 1000,
                     seed: int = 0) -> dict:
    """acc(b) − acc(a) on the same questions, with a 95% percentile interval from resampling
    questions (paired: both models see the same resample)."""
    a = np.asarray(correct_a, dtype=float)
    b = np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired bootstrap needs two non-empty lists over the same questions")
    diff = b - a
    value = float(diff.mean())
    if iters <= 0:
        return {"value": value, "ci_low": value, "ci_high": value}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(iters, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"value": value, "ci_low": float(low), "ci_high": float(high)}
