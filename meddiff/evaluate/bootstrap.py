"""Confidence intervals without N × n_boot arrays: closed-form intervals for means of per-sample
values, and half-sampling (subsampling without replacement) intervals for set-level statistics.

- Means: Wilson score interval for 0/1 values (Wilson, JASA 1927), else the normal interval
  mean ± z·s/√n. O(n) memory.
- Set statistics θ(A, B) (KID, FID, precision, ...): R resamples draw m = ⌊f·n⌋ items *without
  replacement* from every set (one index vector of m per set and resample, never an R×N array).
  With finite-population correction, Var(θ_m | sample) ≈ σ²(1/m − 1/n), so the spread of
  θ_m − mean(θ_m) scaled by √(m/(n − m)) estimates the sampling spread of θ_n (Politis, Romano &
  Wolf, "Subsampling", 1999, ch. 2; f = ½ gives scale 1: the half-sampling of McCarthy 1969). The
  interval is θ_n + scale·(q_{α/2}, q_{1−α/2}) of the centred subsample values, so it brackets θ_n,
  intersected with the statistic's range when it has one (precision ∈ [0, 1], FID ≥ 0): the
  parameter cannot lie outside it, so coverage is kept. It measures variability at n; an
  n-dependent bias (FID) is handled by the matched-n baseline.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

Z95 = 1.959963984540054


def mean_ci(values: torch.Tensor | np.ndarray, n_boot: int = 200, alpha: float = 0.05, seed: int = 0
            ) -> tuple[float, float] | None:
    """95 % CI of the mean of per-sample values N (Wilson for 0/1 values); None if N < 2 or n_boot = 0.

    ``n_boot``/``seed`` are kept for the call signature: a value of 0 switches intervals off."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(v)
    if n < 2 or n_boot <= 0:
        return None
    z = Z95 if alpha == 0.05 else float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - alpha / 2)))
    if np.isin(v, (0.0, 1.0)).all():  # Wilson score interval: honest near 0 and 1
        p = v.mean()
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = max(0.0, centre - half), min(1.0, centre + half)
        return (0.0 if p == 0 else float(lo)), (1.0 if p == 1 else float(hi))  # exact ends, not 1e-18
    half = z * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean() - half), float(v.mean() + half)


def subsample_interval(stat: Callable[..., dict[str, float]], sets: Sequence[torch.Tensor],
                       estimate: dict[str, float], n_resamples: int = 100, frac: float = 0.5,
                       alpha: float = 0.05, seed: int = 0,
                       bounds: dict[str, tuple[float, float]] | None = None) -> dict[str, tuple[float, float]]:
    """Half-sampling intervals of every statistic ``stat(*sets) -> {name: value}`` (see module doc).

    ``estimate``: ``stat(*sets)`` on the full sets (the θ_n the intervals are centred on). Names whose
    value is None/NaN in the estimate or in a resample are left out. ``bounds``: a statistic's range
    (name → (lo, hi), ±inf for none); its interval is clipped to it."""
    if n_resamples <= 0 or min(len(s) for s in sets) < 4:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k, v in estimate.items() if _finite(v)}
    for _ in range(n_resamples):
        sub = [s[torch.as_tensor(rng.choice(len(s), max(2, int(frac * len(s))), replace=False))] for s in sets]
        for k, v in stat(*sub).items():
            if k in draws and _finite(v):
                draws[k].append(float(v))
    out = {}
    for k, vals in draws.items():
        if len(vals) < max(10, n_resamples // 2):
            continue
        v = np.asarray(vals)
        n = min(len(s) for s in sets)
        m = max(2, int(frac * n))
        scale = math.sqrt(m / max(n - m, 1))
        lo, hi = np.quantile(v - v.mean(), [alpha / 2, 1 - alpha / 2]) * scale
        r_lo, r_hi = (bounds or {}).get(k, (-math.inf, math.inf))
        out[k] = (float(max(r_lo, estimate[k] + lo)), float(min(r_hi, estimate[k] + hi)))
    return out


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def small_n_warning(n: int, reliable_n: int, what: str) -> str | None:
    """A warning string when ``n`` samples are too few for ``what`` to be reliable."""
    if n < reliable_n:
        return f"{what} on only {n} samples (< {reliable_n}): unreliable, compare with the CI and the baseline"
    return None
