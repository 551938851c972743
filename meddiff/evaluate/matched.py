"""Matched-n comparisons: a synthetic set and its real baseline scored against the same reference
at the same n, with half-sampling intervals for both and for their difference.

For one scope (overall or a class) and one reference (the training split, or the held-out test
split), the synthetic set S, the baseline set V (real validation images: real data the generator
never saw) and the reference R are subsampled (seeded, without replacement) to one n =
min(|S|, |V|, |R|, cap). Every statistic of S against R and of V against R is then computed on
equally many images, so an n-dependent metric (FID, recall, coverage) is biased the same way on
both sides: the baseline is the number a perfect generator would get *at this n*.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from meddiff.evaluate import bootstrap, fidelity

SET_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")
N_DEPENDENT = {"fid": "n-dependent: compare only with its matched baseline (same n)",
               "kid": None, "precision": None, "density": None,
               "recall": "depends on n (matched here)", "coverage": "depends on n (matched here)"}
# the range of each statistic (intervals are clipped to it); KID's unbiased estimate can be negative
RANGE = {"fid": (0.0, np.inf), "kid": (-np.inf, np.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
         "density": (0.0, np.inf), "coverage": (0.0, 1.0)}
BOUNDS = {**{f"{side}:{m}": r for side in ("syn", "base") for m, r in RANGE.items()},
          **{f"diff:{m}": (r[0] - r[1], r[1] - r[0]) for m, r in RANGE.items()}}  # a difference of two in range


def _paired_stats(k: int):
    """stat(syn, base, ref) → {"syn:<metric>", "base:<metric>", "diff:<metric>"}; ref radii shared."""
    def stat(syn: torch.Tensor, base: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        radii = fidelity.knn_radii(ref, k)
        s, b = fidelity.set_stats(ref, syn, k, radii), fidelity.set_stats(ref, base, k, radii)
        out = {f"syn:{m}": s[m] for m in SET_METRICS}
        out.update({f"base:{m}": b[m] for m in SET_METRICS})
        out.update({f"diff:{m}": s[m] - b[m] for m in SET_METRICS})
        return out
    return stat


def matched_subsets(sizes: tuple[int, ...], cap: int | None, rng: np.random.Generator) -> tuple[int, list[np.ndarray]]:
    """One n = min(sizes, cap) and, per set, n sorted indices drawn without replacement."""
    n = min(min(sizes), cap) if cap else min(sizes)
    return n, [np.sort(rng.choice(s, n, replace=False)) if s > n else np.arange(s) for s in sizes]


def _class_quota(target: np.ndarray, others: list[np.ndarray], most: float) -> tuple[np.ndarray, np.ndarray]:
    """(classes, n_c): n_c = ⌊α · s_c⌋ of each class c of ``target`` (s_c its count there), α as large as every
    set in ``others`` holds and at most ``most``. Classes some set lacks are left out."""
    classes, s = np.unique(target, return_counts=True)
    have = np.array([[(y == c).sum() for c in classes] for y in others]).reshape(len(others), len(classes))
    keep = (have > 0).all(0)
    classes, s, have = classes[keep], s[keep], have[:, keep]
    alpha = min(float((have / s).min()), most) if len(classes) else 0.0
    return classes, np.floor(alpha * s + 1e-9).astype(int)


def _draw(y: np.ndarray, classes: np.ndarray, n_c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of n_c samples of each class c in labels ``y``, without replacement."""
    picks = [rng.choice(np.flatnonzero(y == c), m, replace=False) for c, m in zip(classes, n_c)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def mixed_subsets(labels: tuple[np.ndarray, ...], cap: int | None, rng: np.random.Generator
                  ) -> tuple[int, list[np.ndarray]]:
    """One n and, per set, n sorted indices with the class mix of the first set: every set gets the same
    count of each class, as many as every set and ``cap`` allow (at most the first set's own)."""
    most = min(1.0, cap / len(labels[0])) if cap else 1.0
    classes, n_c = _class_quota(labels[0], list(labels[1:]), most)
    return int(n_c.sum()), [_draw(y, classes, n_c, rng) for y in labels]


def mixed_like(y: np.ndarray, target: np.ndarray, rng: np.random.Generator, most: int | None = None) -> np.ndarray:
    """Sorted indices of the largest subsample of labels ``y`` with the class mix of labels ``target`` (at most
    ``most`` of them)."""
    classes, n_c = _class_quota(target, [y], most / len(target) if most else np.inf)
    return _draw(y, classes, n_c, rng)


def compare(syn: torch.Tensor, base: torch.Tensor, ref: torch.Tensor, *, extractor: str, scope: str,
            reference: str, k: int, min_n: int, reliable_n: int, cap: int | None, resamples: int,
            seed: int, labels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Records of every set metric (synthetic vs ``ref`` beside baseline vs ``ref``) at a matched n.

    syn S×D, base V×D, ref R×D features of one scope; ``reference``: "train" | "heldout". ``labels`` (the
    three sets' classes): baseline and reference are drawn with the synthetic set's class mix
    (:func:`mixed_subsets`), so a cohort is not judged on a class mix its user chose."""
    rng = np.random.default_rng(seed)
    if labels is None:
        n, (i_s, i_b, i_r) = matched_subsets((len(syn), len(base), len(ref)), cap, rng)
    else:
        n, (i_s, i_b, i_r) = mixed_subsets(labels, cap, rng)
    head = {"extractor": extractor, "scope": scope, "reference": reference, "n": n, "n_ref": n,
            **({"class_mix": "the cohort's"} if labels is not None else {})}
    need = max(min_n, k + 2)
    if n < need:
        w = f"skipped: only {n} images in the smallest of synthetic/baseline/reference (< {need})"
        return [{**head, "metric": m, "value": None, "ci": None, "warning": w, "baseline": None, "difference": None}
                for m in SET_METRICS]
    sets = (syn[i_s].float(), base[i_b].float(), ref[i_r].float())
    if not all(torch.isfinite(s).all() for s in sets):
        w = "skipped: non-finite (NaN/inf) features"
        return [{**head, "metric": m, "value": None, "ci": None, "warning": w, "baseline": None, "difference": None}
                for m in SET_METRICS]
    stat = _paired_stats(k)
    est = stat(*sets)
    ci = bootstrap.subsample_interval(stat, sets, est, resamples, seed=seed, bounds=BOUNDS) if n >= 2 * need else {}
    warn = bootstrap.small_n_warning(n, reliable_n, "computed")
    out = []
    for m in SET_METRICS:
        out.append({**head, "metric": m, "value": est[f"syn:{m}"], "ci": _l(ci.get(f"syn:{m}")),
                    "warning": warn, "note": N_DEPENDENT[m], "k": k,
                    "baseline": {"value": est[f"base:{m}"], "n": n, "n_ref": n, "ci": _l(ci.get(f"base:{m}")),
                                 "warning": warn},
                    "difference": {"value": est[f"diff:{m}"], "ci": _l(ci.get(f"diff:{m}"))}})
    return out


def _l(t: tuple[float, float] | None) -> list[float] | None:
    return list(t) if t else None


def mean_difference(value: float | None, ci: list[float] | None, base: float | None,
                    base_ci: list[float] | None, span: float = np.inf) -> dict[str, Any]:
    """Difference of two independent means with its normal-approximation interval (half-widths in
    quadrature), clipped to ±``span`` (the width of the values' range: 1 for fractions)."""
    if value is None or base is None:
        return {"value": None, "ci": None}
    d = value - base
    if not ci or not base_ci:
        return {"value": d, "ci": None}
    h = ((ci[1] - ci[0]) ** 2 + (base_ci[1] - base_ci[0]) ** 2) ** 0.5 / 2
    return {"value": d, "ci": [max(-span, d - h), min(span, d + h)]}
