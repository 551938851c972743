"""Percentile bootstrap confidence intervals (Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993) and small-sample warnings."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def mean_ci(values: torch.Tensor | np.ndarray, n_boot: int = 200, alpha: float = 0.05, seed: int = 0
            ) -> tuple[float, float] | None:
    """CI of the mean of per-sample values N (resampled with replacement); None if N < 2 or n_boot = 0."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) < 2 or n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def two_sample_ci(fn: Callable[[torch.Tensor, torch.Tensor], float], a: torch.Tensor, b: torch.Tensor,
                  n_boot: int = 20, alpha: float = 0.05, seed: int = 0) -> tuple[float, float] | None:
    """CI of a set-level statistic fn(a, b) (e.g. FID), resampling both sets with replacement."""
    if n_boot <= 0 or len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    vals = [fn(a[torch.as_tensor(rng.integers(0, len(a), len(a)))], b[torch.as_tensor(rng.integers(0, len(b), len(b)))])
            for _ in range(n_boot)]
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def small_n_warning(n: int, reliable_n: int, what: str) -> str | None:
    """A warning string when ``n`` samples are too few for ``what`` to be reliable."""
    if n < reliable_n:
        return f"{what} on only {n} samples (< {reliable_n}): unreliable, compare with the CI and the baseline"
    return None
