"""The evaluation's configuration: one frozen dataclass, checked up front."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from meddiff.devices import check_device
from meddiff.errors import MeddiffError, check_seed
from meddiff.evaluate.features import EXTRACTORS, DomainTrainConfig
from meddiff.evaluate.memorization import FlagRule

TstrProtocol = Literal["fair", "medmnist"]


@dataclass(frozen=True)
class EvalConfig:
    real_uri: str | None = None  # real dataset version to compare with; None → the cohort's dataset_uri
    # extractors for the feature-set metrics (FID, KID, precision/recall, density/coverage); the domain
    # classifier is trained either way (label oracle + memorization features)
    features: tuple[str, ...] = ("inception", "domain")
    max_images: int | None = 1000  # per set (synthetic/train/val/held-out) for Inception (~0.15 s/image on 2 CPU cores); None = all
    heldout_split: str = "test"  # the held-out reference: a real split the generator never saw (val is the baseline)
    knn_k: int = 5  # k of the k-NN manifolds (precision/recall, density/coverage)
    interval_resamples: int = 100  # half-samples (without replacement) behind every set-metric interval; 0 = none
    class_intervals: bool = False  # half-sampling intervals per class too (×classes the cost); overall always
    ssim_pairs: int = 500  # random image pairs per class for the intra-class SSIM diversity
    memorization_quantile: float = 0.01  # flag images closer to train than this quantile of real val→train distances
    # "either": a copy in pixel space (mirrors, noise and JPEG included) OR in domain-feature space
    flag_rule: FlagRule = "either"
    # pixel threshold = max(the quantile above, copy_ratio × the median val→train pixel RMSE): datasets with
    # near-duplicates across their official splits (BreastMNIST) would otherwise set it below a noised copy
    copy_ratio: float = 0.1
    mirror_copies: bool = True  # a left–right mirrored training image counts as a copy in the memorization check
    drop_flagged: bool = False  # consumers skip flagged images by default (recorded in report.json); TSTR too
    tstr: bool = False  # train on synthetic, test on real: three classifier trainings (minutes on CPU)
    tstr_protocol: TstrProtocol = "fair"  # fair: equal steps, val-selected (CPU-sized); medmnist: ResNet-18 v2 recipe (GPU)
    tstr_steps: int = 300  # "fair": optimizer steps per setting, the same for real / synthetic / real+synthetic
    tstr_max_images: int | None = None  # cap on each TSTR training set (seeded subsample; CI budget); None = all
    reliable_n: int = 250  # set-level metrics on fewer samples carry a "too few samples" warning
    min_n: int = 10  # below this many samples a metric is not computed (reported as skipped)
    domain: DomainTrainConfig = field(default_factory=DomainTrainConfig)  # domain classifier training
    cache_root: str | None = None  # where the domain classifier is cached; None → <storage root>/cache
    grid_per_class: int = 8  # images per class in the report's sample grids
    # real (held-out) and synthetic points each in report.html's UMAP of domain features (seeded subsample;
    # umap-learn, ~10 s on 2 CPU cores); 0 = no UMAP section
    umap_points: int = 1000
    closest_pairs: int = 12  # closest synthetic/training pairs shown in the report
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0  # subsampling, interval and TSTR seed

    def check(self) -> "EvalConfig":
        check_seed(self.seed)
        feats = tuple(self.features)
        bad = [f for f in feats if f not in EXTRACTORS]
        if not feats or bad:
            raise MeddiffError(f"unknown feature extractor(s) {bad or '(none given)'}; choose from {list(EXTRACTORS)}")
        if self.flag_rule not in get_args(FlagRule):
            raise MeddiffError(f"flag_rule must be one of {get_args(FlagRule)}, got {self.flag_rule!r}")
        if self.tstr_protocol not in get_args(TstrProtocol):
            raise MeddiffError(f"tstr_protocol must be one of {get_args(TstrProtocol)}, got {self.tstr_protocol!r}")
        if not 0 <= self.copy_ratio < 1:
            raise MeddiffError(f"copy_ratio must be in [0, 1), got {self.copy_ratio}")
        if not 0 < self.memorization_quantile < 1:
            raise MeddiffError(f"memorization_quantile must be in (0, 1), got {self.memorization_quantile}")
        if self.max_images is not None and self.max_images < 2:
            raise MeddiffError(f"max_images must be ≥ 2 (0 or None: all images), got {self.max_images}")
        d = self.domain
        # "<field> must ...": the CLI names the option typed (meddiff.cli.in_flags), Python users the field
        for name, bad in (("domain_steps", d.steps < 1), ("domain_batch_size", d.batch_size < 1)):
            if bad:
                raise MeddiffError(f"{name} must be ≥ 1 (an untrained domain classifier scores nothing), "
                                   f"got {getattr(d, name.removeprefix('domain_'))}")
        if not d.lr > 0:
            raise MeddiffError(f"domain_lr must be > 0 (an untrained domain classifier scores nothing), got {d.lr}")
        check_seed(d.seed, "domain seed")
        if self.tstr_max_images is not None and self.tstr_max_images < 2:
            raise MeddiffError(f"tstr_max_images must be ≥ 2 (or left out for all), got {self.tstr_max_images}")
        if self.heldout_split in ("val", "train"):
            raise MeddiffError(f"heldout_split must be 'test' (val is the baseline, train the generator's data), "
                               f"got {self.heldout_split!r}")
        if self.umap_points < 0 or 0 < self.umap_points < 8:
            raise MeddiffError(f"umap_points must be 0 (no UMAP) or ≥ 8, got {self.umap_points}")
        for name, least in (("tstr_steps", 1), ("knn_k", 1), ("min_n", 2), ("interval_resamples", 0)):
            if getattr(self, name) < least:
                raise MeddiffError(f"{name} must be ≥ {least}, got {getattr(self, name)}")
        if 0 < self.interval_resamples < 100:
            raise MeddiffError(f"interval_resamples must be 0 (off) or ≥ 100 for a stable 95 % interval, "
                               f"got {self.interval_resamples}")
        check_device(self.device)
        return replace(self, features=tuple(dict.fromkeys(feats)))
