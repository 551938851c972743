"""Memorization / privacy: nearest training image of every synthetic image, in feature and pixel space.

An image is flagged when it is closer to its nearest training image than a low quantile of the
real-validation→training nearest-neighbour distances: closer than held-out real patients
normally are to the training set (cf. the "authenticity"/copy tests of Alaa et al., ICML 2022,
and Carlini et al., "Extracting Training Data from Diffusion Models", USENIX Security 2023).
"""

from __future__ import annotations

from typing import Literal

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


def pixel_rmse_nearest(query: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest image in pixel space: images N×C×H×W and M×C×H×W in [0, 1] → (RMSE N, index N)."""
    dist, index = nearest(query.flatten(1), ref.flatten(1))
    return dist / query[0].numel() ** 0.5 if len(query) else dist, index


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
