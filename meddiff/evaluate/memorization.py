"""Memorization / privacy: nearest training image of every synthetic image, in feature and pixel space.

An image is flagged when it is closer to its nearest training image than a low quantile of the
real-validation→training nearest-neighbour distances: closer than held-out real patients
normally are to the training set (cf. the "authenticity"/copy tests of Alaa et al., ICML 2022,
and Carlini et al., "Extracting Training Data from Diffusion Models", USENIX Security 2023).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

FlagRule = Literal["both", "either", "pixel", "feature"]


def nearest(query: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest row of ref M×D for each row of query N×D: (Euclidean distance N, index N).

    The search uses the fast ‖q‖² + ‖r‖² − 2 q·r form; the distance of the chosen pair is then
    recomputed directly, so an exact copy gets exactly 0.
    """
    if len(ref) == 0:
        raise ValueError("empty reference set")
    q, r = query.float(), ref.float()
    r_sq = r.square().sum(1)
    idx = []
    for i in range(0, len(q), chunk):
        qb = q[i:i + chunk]
        d2 = qb.square().sum(1, keepdim=True) + r_sq[None] - 2 * qb @ r.T
        idx.append(d2.argmin(1))
    index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    dist = (q - r[index]).square().sum(1).sqrt()
    return dist, index


def _as_float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """One chunk → float32 N×D in [0, 1] (uint8 images are converted here, per chunk, never whole)."""
    t = torch.as_tensor(x)
    return t.flatten(1).float().div_(255) if t.dtype == torch.uint8 else t.flatten(1).float()


def pixel_rmse_nearest(query: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, mirror: bool = False,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest image in pixel space: images N×C×H×W and M×C×H×W (uint8, or float in [0, 1]) →
    (RMSE N, index N). Both sets are converted chunk by chunk (bounded memory; exact search).

    ``mirror``: the reference also holds every image flipped left–right; the index of a mirrored
    match is ``M + i`` (a mirrored copy of a training image is a copy)."""
    n, m = len(query), len(ref)
    if m == 0:
        raise ValueError("empty reference set")
    best_d = torch.full((n,), float("inf"))
    best_i = torch.zeros(n, dtype=torch.long)
    flips = (False, True) if mirror else (False,)
    for r0 in range(0, m, chunk):
        for flipped in flips:
            rb = torch.as_tensor(ref[r0:r0 + chunk])
            r = _as_float(rb.flip(-1) if flipped else rb)
            r_sq = r.square().sum(1)
            for q0 in range(0, n, chunk):
                q = _as_float(query[q0:q0 + chunk])
                d2 = (q.square().sum(1, keepdim=True) + r_sq[None] - 2 * q @ r.T).clamp_(min=0)
                d, i = d2.min(1)
                better = d < best_d[q0:q0 + chunk]
                best_d[q0:q0 + chunk] = torch.where(better, d, best_d[q0:q0 + chunk])
                best_i[q0:q0 + chunk] = torch.where(better, i + r0 + (m if flipped else 0), best_i[q0:q0 + chunk])
    # exact re-computation of the chosen pair: an exact copy gets exactly 0
    dist = torch.empty(n)
    for q0 in range(0, n, chunk):
        idx = best_i[q0:q0 + chunk]
        base = torch.as_tensor(np.asarray(ref)[(idx % m).numpy()]) if not isinstance(ref, torch.Tensor) \
            else ref[idx % m]
        base = torch.where((idx >= m)[:, None, None, None], base.flip(-1), base)
        dist[q0:q0 + chunk] = (_as_float(query[q0:q0 + chunk]) - _as_float(base)).square().mean(1).sqrt()
    return dist, best_i


def threshold(reference_distances: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of real-val→train nearest distances: closer than this is suspicious."""
    if len(reference_distances) == 0:
        raise ValueError("no reference distances")
    return float(torch.quantile(reference_distances.double(), quantile))


def flag(feature_dist: torch.Tensor, pixel_dist: torch.Tensor, feature_threshold: float, pixel_threshold: float,
         rule: FlagRule = "both") -> torch.Tensor:
    """Bool N: too close to a training image (distance ≤ threshold) under ``rule``."""
    f, p = feature_dist <= feature_threshold, pixel_dist <= pixel_threshold
    return {"both": f & p, "either": f | p, "feature": f, "pixel": p}[rule]
