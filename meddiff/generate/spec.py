"""What a cohort request is (``CohortSpec``: model, per-class quotas, sampler, seed, ...) and what a
finished cohort returns (``CohortResult``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from meddiff.data.cohorts import UNKNOWN_CLASS
from meddiff.devices import check_device
from meddiff.errors import COUNT_FORMS, MeddiffError, check_seed
from meddiff.models.samplers import Sampler

@dataclass(frozen=True)
class CohortSpec:
    model_uri: str  # a complete model (model.json present)
    per_class: int | None = None  # N images of every class
    total: int | None = None  # N images: split evenly over classes, or by `ratios` when given
    ratios: str | None = None  # prevalence ratios "name=p,..." of `total`: every class named (relative weights), or
    # shares summing to 1 (unlisted classes get 0)
    sampler: Sampler | Literal["auto"] = "auto"  # auto = measured best: ddim for ε, dpmpp2m for v, heun for
    # rectified flow; ddim (η=0), ddpm (ancestral, η=1) and dpmpp2m serve ε/v models, rflow (Euler) and heun rflow
    steps: int | None = None  # reverse-diffusion steps (heun: 2·steps − 1 network calls); None = the sampler's
    # measured default (samplers.DEFAULT_STEPS: ddim 50, ddpm 100, dpmpp2m/rflow/heun 25; README "Generate")
    guidance: float | None = None  # CFG scale (conditional models only); None = 2.0, or 1.0 for a model trained
    # without label dropout (no null label; other values are refused)
    seed: int = 0  # base seed; sample i's seed derives from (seed, i)
    batch_size: int = 64  # images per forward pass (recorded: it can move an image's last bits)
    device: str = "auto"  # auto = cuda when available, else cpu
    shard_size: int = 1000  # images per shard = per resumable chunk
    name: str | None = None  # cohort id; None = <model run>-<content hash of the spec>
    unconditional: bool = False  # conditional models trained with label dropout: sample p(x) through the null
    # label, "regardless of class" (needs --total; the manifest's class is "(unknown)", evaluate records the oracle's)

    def check(self) -> "CohortSpec":
        check_seed(self.seed)
        if self.sampler not in (*get_args(Sampler), "auto"):
            raise MeddiffError(f"unknown sampler {self.sampler!r}; choose auto or one of {get_args(Sampler)}")
        forms = sum(x is not None for x in (self.per_class, self.total))
        if forms != 1:
            raise MeddiffError(COUNT_FORMS)
        if self.ratios is not None and self.total is None:
            raise MeddiffError("--ratios needs --total N: the ratios split that total")
        for label, n in (("--per-class", self.per_class), ("--total", self.total)):
            if n is not None and n <= 0:
                raise MeddiffError(f"{label} must be a positive count, got {n}")
        if self.unconditional and (self.total is None or self.ratios is not None):
            raise MeddiffError("--unconditional asks for no class: give --total N (not --per-class or --ratios)")
        if self.unconditional and self.guidance is not None:
            raise MeddiffError("--guidance has nothing to guide towards with --unconditional (no class is asked); "
                               "leave it unset")
        if self.steps is not None and self.steps < 1:
            raise MeddiffError(f"--steps must be ≥ 1, got {self.steps}")
        check_device(self.device)
        if self.batch_size < 1 or self.shard_size < 1:
            raise MeddiffError("--batch-size and --shard-size must be positive")
        if self.guidance is not None and self.guidance < 0:
            raise MeddiffError(f"--guidance must be ≥ 0, got {self.guidance}")
        if self.guidance == 0:  # ε̃ = ε(x_t, ∅): the asked class drops out of every image
            raise MeddiffError("--guidance 0 samples ignore their class: every image would be an unconditional "
                               "sample labelled with a class it was not drawn from; use --unconditional --total N "
                               "for p(x), or a scale > 0 (1 = plain conditional, 2 = the default)")
        if self.name is not None and ("/" in self.name or "." in self.name or not self.name):
            raise MeddiffError(f"cohort name {self.name!r} must be a plain name without '/' or '.'")
        return self

    def quotas(self, class_names: list[str]) -> dict[str, int]:
        """Images per class, in class order; sums exactly to the requested total. Unconditional: one
        quota under ``UNKNOWN_CLASS``."""
        k = len(class_names)
        if self.unconditional:
            return {UNKNOWN_CLASS: int(self.total or 0)}
        if self.per_class is not None:
            return {c: self.per_class for c in class_names}
        assert self.total is not None
        if self.ratios is None:
            weights = np.ones(k)
        else:
            weights, named = np.zeros(k), set()
            for name, p in parse_ratios(self.ratios):
                cid = int(name) if name.isdigit() and int(name) < k else (
                    class_names.index(name) if name in class_names else None)
                if cid is None:
                    raise MeddiffError(f"unknown class {name!r} in --ratios; classes are: {class_names} "
                                       "(names or 0-based ids)")
                weights[cid] = p
                named.add(cid)
            if (weights < 0).any() or weights.sum() <= 0:
                raise MeddiffError("--ratios must be non-negative and not all zero")
            if len(named) < k and abs(weights.sum() - 1) > 1e-6:  # 'malignant=0.3' alone meant 100 % malignant
                unnamed = ", ".join(c for i, c in enumerate(class_names) if i not in named)
                raise MeddiffError(f"--ratios names {len(named)} of {k} classes and sums to {weights.sum():.4g}: give "
                                   f"shares that sum to 1 (unnamed classes — {unnamed} — then get 0), or name every "
                                   "class (then they are relative weights, e.g. 'a=2,b=1')")
        exact = weights / weights.sum() * self.total
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: self.total - counts.sum()]:  # largest remainder
            counts[i] += 1
        if self.ratios is None and (counts == 0).any():
            raise MeddiffError(f"--total {self.total} is smaller than the number of classes ({k})")
        return {c: int(n) for c, n in zip(class_names, counts)}


def parse_ratios(text: str) -> list[tuple[str, float]]:
    """``"a=0.7,b, c=0.3"`` → [("a", 0.7), ("b, c", 0.3)]: class names may contain commas, not '='."""
    parts = text.split("=")
    if len(parts) < 2:
        raise MeddiffError(f"--ratios must look like name=p,name=p; got {text!r}")
    out, name = [], parts[0].strip()
    for i, middle in enumerate(parts[1:]):
        last = i == len(parts) - 2
        m = re.fullmatch(r"\s*([-+0-9.eE]+)\s*" + ("" if last else r",(.*)"), middle, flags=re.S)
        if not m:
            raise MeddiffError(f"--ratios: cannot read a number after {name!r} in {text!r}")
        try:
            out.append((name, float(m.group(1))))
        except ValueError:
            raise MeddiffError(f"--ratios: {m.group(1)!r} (for {name!r}) is not a number") from None
        name = "" if last else m.group(2).strip()
    return out


@dataclass(frozen=True)
class CohortResult:
    uri: str  # the cohort's location: pass it to evaluate / cohorts verify
    card: dict
    existed: bool  # True when the complete cohort was already there (no work done)
    counts: dict[str, int]


