"""Evaluate a synthetic cohort against its real dataset: fidelity, diversity, privacy, utility.

``evaluate_cohort(cohort_uri, cfg)`` computes every metric overall and per class, each beside a
real-vs-real baseline (validation vs training split), fills the manifest's quality columns, and
writes ``report.html`` then ``report.json`` (last: the report is complete when it exists) into
the cohort folder. The metric functions live in :mod:`meddiff.metrics`; this module wires them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, get_args

import numpy as np
import pandas as pd
import torch

from meddiff import storage
from meddiff.data.cohorts import Cohort, open_cohort, write_quality
from meddiff.devices import check_device, resolve_device
from meddiff.locks import artifact_lock
from meddiff.threads import configure_threads
from meddiff.errors import ArtifactError, MeddiffError
from meddiff.data.images import decode_png
from meddiff.evaluate import bootstrap, fidelity, memorization, similarity
from meddiff.evaluate.features import (EXTRACTORS, DomainTrainConfig, domain_cache_uri,
                               load_inception, load_or_train_domain)
from meddiff.evaluate.memorization import FlagRule
from meddiff.evaluate.html import render_html
from meddiff.evaluate.summary import make_headline
from meddiff.progress import Progress
from meddiff.records import content_hash, make_record, sha256_bytes
from meddiff.data.shards import DatasetVersion, iter_shard, open_dataset

REPORT_SCHEMA_VERSION = 1
REPORT_JSON, REPORT_HTML = "report.json", "report.html"


@dataclass(frozen=True)
class EvalConfig:
    real_uri: str | None = None  # real dataset version to compare with; None → the cohort's dataset_uri
    # extractors for the feature-set metrics (FID, KID, precision/recall, density/coverage); the domain
    # classifier is trained either way (label oracle + memorization features)
    features: tuple[str, ...] = ("inception", "domain")
    max_images: int | None = 1000  # per set (synthetic/train/val) for Inception (~0.15 s/image on 2 CPU cores); None = all
    knn_k: int = 5  # k of the k-NN manifolds (precision/recall, density/coverage)
    kid_subsets: int = 50  # random subsets averaged by KID
    kid_subset_size: int = 1000  # KID subset size, capped at the smaller set
    ssim_pairs: int = 500  # random image pairs per class for the intra-class SSIM diversity
    memorization_quantile: float = 0.01  # flag images closer to train than this quantile of real val→train distances
    flag_rule: FlagRule = "both"  # "both": closer than the threshold in feature AND pixel space (fewest false alarms)
    drop_flagged: bool = False  # consumers skip flagged images by default (recorded in report.json); TSTR too
    tstr: bool = False  # train on synthetic, test on real: three ResNet-18 trainings (minutes on CPU)
    tstr_epochs: int = 3  # epochs per TSTR training (the MedMNIST v2 protocol uses 100)
    tstr_max_images: int | None = None  # cap on each TSTR training set (seeded subsample; CI budget); None = all
    bootstrap_samples: int = 200  # resamples for the CIs of per-sample means (SSIM, precision, flags, ...)
    fid_bootstrap: int = 10  # resamples for FID CIs; computed when both sets have ≤ fid_bootstrap_max_n images
    fid_bootstrap_max_n: int = 1000  # "small sample" limit for FID CIs (larger sets: sampling error is small)
    reliable_n: int = 250  # set-level metrics on fewer samples carry a "too few samples" warning
    min_n: int = 10  # below this many samples a metric is not computed (reported as skipped)
    domain: DomainTrainConfig = field(default_factory=DomainTrainConfig)  # domain classifier training
    cache_root: str | None = None  # where the domain classifier is cached; None → <storage root>/cache
    grid_per_class: int = 8  # images per class in the report's sample grids
    closest_pairs: int = 12  # closest synthetic/training pairs shown in the report
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0  # subsampling, bootstrap and TSTR seed

    def check(self) -> "EvalConfig":
        feats = tuple(self.features)
        bad = [f for f in feats if f not in EXTRACTORS]
        if not feats or bad:
            raise MeddiffError(f"unknown feature extractor(s) {bad or '(none given)'}; choose from {list(EXTRACTORS)}")
        if self.flag_rule not in get_args(FlagRule):
            raise MeddiffError(f"flag_rule must be one of {get_args(FlagRule)}, got {self.flag_rule!r}")
        if not 0 < self.memorization_quantile < 1:
            raise MeddiffError(f"memorization_quantile must be in (0, 1), got {self.memorization_quantile}")
        if self.max_images is not None and self.max_images < 2:
            raise MeddiffError("max_images must be ≥ 2 (or None for all)")
        if self.tstr_epochs < 1 or self.knn_k < 1 or self.min_n < 2:
            raise MeddiffError("tstr_epochs and knn_k must be ≥ 1, min_n ≥ 2")
        check_device(self.device)
        return replace(self, features=tuple(dict.fromkeys(feats)))


@dataclass(frozen=True)
class EvalResult:
    report_uri: str  # <cohort>/report.json
    report: dict[str, Any]  # its content
    existed: bool = False  # True: an up-to-date report was found and nothing was recomputed

    @property
    def html_uri(self) -> str:
        return self.report_uri.rsplit("/", 1)[0] + "/" + REPORT_HTML


# --------------------------------------------------------------------------- loading and checks

@dataclass(frozen=True)
class Images:
    x: np.ndarray  # uint8 N×C×H×W
    y: np.ndarray  # int64 N (class ids)
    keys: list[str]  # sample keys

    def __len__(self) -> int:
        return len(self.y)


def load_images(shard_uris: list[str]) -> Images:
    """Every sample of the shards, in order: images, class ids, keys."""
    xs, ys, keys = [], [], []
    for uri in shard_uris:
        for s in iter_shard(uri):
            xs.append(decode_png(s["png"]))
            ys.append(int(s["cls"]))
            keys.append(s["__key__"])
    if not xs:
        return Images(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), [])
    return Images(np.stack(xs), np.asarray(ys, np.int64), keys)


def load_cohort_images(cohort: Cohort, manifest: pd.DataFrame) -> Images:
    """The cohort's images in manifest order; a clear ArtifactError when shards and manifest disagree."""
    by_key: dict[str, bytes] = {}
    for uri in cohort.shard_uris():
        if not storage.exists(uri):
            raise ArtifactError(f"cohort shard {uri} is missing")
        for s in iter_shard(uri):
            by_key[s["__key__"]] = s["png"]
    missing = [k for k in manifest["key"] if k not in by_key]
    if missing:
        raise ArtifactError(f"{cohort.uri}: {len(missing)} manifest keys are not in the shards (e.g. {missing[:3]}); "
                            "the manifest is corrupt or the cohort incomplete")
    if len(manifest) == 0:
        raise ArtifactError(f"{cohort.uri}: the manifest has no images")
    x = np.stack([decode_png(by_key[k]) for k in manifest["key"]])
    return Images(x, manifest["class_id"].to_numpy(np.int64), list(manifest["key"]))


def check_compatible(cohort: Cohort, manifest: pd.DataFrame, dataset: DatasetVersion, syn: Images) -> None:
    """Classes, class ids and image shape of the cohort must match the real dataset's."""
    if cohort.class_names != dataset.class_names:
        raise MeddiffError(f"cohort classes {cohort.class_names} do not match the real dataset's "
                           f"{dataset.class_names} ({dataset.uri}); pass the dataset the model was trained on")
    ids = manifest["class_id"].to_numpy()
    if ids.min() < 0 or ids.max() >= dataset.num_classes:
        raise ArtifactError(f"{cohort.uri}: manifest class ids outside 0..{dataset.num_classes - 1}")
    names = np.asarray(dataset.class_names, dtype=object)[ids]
    if (names != manifest["class_name"].to_numpy(dtype=object)).any():
        raise ArtifactError(f"{cohort.uri}: manifest class_name disagrees with class_id")
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    if tuple(syn.x.shape[1:]) != shape:
        raise MeddiffError(f"cohort images are {tuple(syn.x.shape[1:])} (C×H×W), the real dataset's {shape}")


# --------------------------------------------------------------------------- metric records

def _record(metric: str, extractor: str, scope: str, value: float | None, n: int, n_ref: int | None,
            ci: tuple[float, float] | None = None, warning: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"metric": metric, "extractor": extractor, "scope": scope, "value": value, "n": n, "n_ref": n_ref,
            "ci": list(ci) if ci else None, "warning": warning, **extra}


def set_metrics(real: torch.Tensor, fake: torch.Tensor, extractor: str, scope: str, cfg: EvalConfig,
                seed: int, real_radii: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """FID, KID, precision, recall, density, coverage of ``fake`` against ``real`` (features R×D, S×D).

    ``real_radii``: the real set's k-NN radii when already computed (shared by synthetic and baseline)."""
    n, n_ref = len(fake), len(real)
    names = ("fid", "kid", "precision", "recall", "density", "coverage")
    if min(n, n_ref) < max(cfg.min_n, cfg.knn_k + 1):
        w = f"skipped: {n} vs {n_ref} samples (< {max(cfg.min_n, cfg.knn_k + 1)})"
        return [_record(m, extractor, scope, None, n, n_ref, warning=w) for m in names]
    warn = bootstrap.small_n_warning(min(n, n_ref), cfg.reliable_n, "computed")
    fid_ci = None
    if max(n, n_ref) <= cfg.fid_bootstrap_max_n:
        fid_ci = bootstrap.two_sample_ci(fidelity.fid, real, fake, cfg.fid_bootstrap, seed=seed)
    kid_mean, kid_std, kid_size = fidelity.kid(real, fake, cfg.kid_subsets, cfg.kid_subset_size, seed)
    radii = fidelity.knn_radii(real, cfg.knn_k) if real_radii is None else real_radii
    in_real, in_fake = fidelity.precision_recall_indicators(real, fake, cfg.knn_k, radii)
    dens, cov = fidelity.density_coverage_indicators(real, fake, cfg.knn_k, radii)
    ci = lambda v: bootstrap.mean_ci(v.float(), cfg.bootstrap_samples, seed=seed)  # noqa: E731
    return [
        _record("fid", extractor, scope, fidelity.fid(real, fake), n, n_ref, fid_ci, warn),
        _record("kid", extractor, scope, kid_mean, n, n_ref, None, warn, std=kid_std, subset_size=kid_size),
        _record("precision", extractor, scope, float(in_real.float().mean()), n, n_ref, ci(in_real), warn, k=cfg.knn_k),
        _record("recall", extractor, scope, float(in_fake.float().mean()), n, n_ref, ci(in_fake), warn, k=cfg.knn_k),
        _record("density", extractor, scope, float(dens.mean()), n, n_ref, ci(dens), warn, k=cfg.knn_k),
        _record("coverage", extractor, scope, float(cov.float().mean()), n, n_ref, ci(cov), warn, k=cfg.knn_k),
    ]


def mean_record(metric: str, extractor: str, scope: str, values: torch.Tensor, n_ref: int | None,
                cfg: EvalConfig, seed: int, **extra: Any) -> dict[str, Any]:
    """A metric that is the mean of per-sample values, with its bootstrap CI."""
    n = len(values)
    if n < 1:
        return _record(metric, extractor, scope, None, 0, n_ref, warning="skipped: no samples", **extra)
    warning = bootstrap.small_n_warning(n, cfg.min_n, "computed")
    return _record(metric, extractor, scope, float(values.float().mean()), n, n_ref,
                   bootstrap.mean_ci(values.float(), cfg.bootstrap_samples, seed=seed), warning, **extra)


def paired(syn: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attach each baseline record to its synthetic twin (same metric, extractor, scope)."""
    idx = {(b["metric"], b["extractor"], b["scope"]): b for b in base}
    out = []
    for r in syn:
        b = idx.get((r["metric"], r["extractor"], r["scope"]))
        out.append({**r, "baseline": {k: b[k] for k in ("value", "n", "n_ref", "ci", "warning")} if b else None})
    return out


def subsample(n: int, max_n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most max_n of n items (all when max_n is None or ≥ n)."""
    if max_n is None or n <= max_n:
        return np.arange(n)
    return np.sort(rng.choice(n, max_n, replace=False))


# --------------------------------------------------------------------------- the evaluation

def real_dataset_uri(cohort: Cohort, cfg: EvalConfig) -> str:
    """The real dataset to compare with: the config's, else the cohort card's, else the model card's."""
    if cfg.real_uri:
        return cfg.real_uri
    if cohort.card.get("dataset_uri"):
        return cohort.card["dataset_uri"]
    model_uri = cohort.card.get("model_uri")
    if model_uri and storage.exists(storage.join(model_uri, "model.json")):
        uri = (storage.read_json(storage.join(model_uri, "model.json")).get("dataset") or {}).get("uri")
        if uri:
            return uri
    raise MeddiffError(f"{cohort.uri}: cohort.json names no real dataset (nor does its model card); "
                       "pass the dataset version with --real")


def _config_hash(cfg: EvalConfig, dataset_uri: str) -> str:
    return content_hash({"config": cfg, "dataset_uri": dataset_uri, "schema": REPORT_SCHEMA_VERSION})


def evaluate_cohort(cohort_uri: str, cfg: EvalConfig | None = None, progress: Progress | None = None,
                    force: bool = False) -> EvalResult:
    """Evaluate a cohort; writes ``report.html``, the manifest quality columns, then ``report.json``.

    An up-to-date report (same config and dataset) is reused unless ``force``. One evaluation of a
    cohort at a time: a concurrent one waits (meddiff.locks), then reuses the report just written.
    """
    with artifact_lock(storage.join(cohort_uri.rstrip("/"), "report")):
        return _evaluate_locked(cohort_uri, cfg, progress, force)


def _evaluate_locked(cohort_uri: str, cfg: EvalConfig | None, progress: Progress | None, force: bool) -> EvalResult:
    cfg = (cfg or EvalConfig()).check()
    device = str(resolve_device(cfg.device))
    cohort = open_cohort(cohort_uri)
    report_uri = storage.join(cohort.uri, REPORT_JSON)
    dataset = open_dataset(real_dataset_uri(cohort, cfg))
    chash = _config_hash(cfg, dataset.uri)
    if not force and storage.exists(report_uri):
        try:
            old = storage.read_json(report_uri)
        except (ValueError, OSError):
            old = {}
        if old.get("config_hash") == chash and storage.exists(storage.join(cohort.uri, REPORT_HTML)):
            return EvalResult(report_uri, old, existed=True)

    configure_threads()  # CPU threads that fit the machine now (meddiff.threads)
    stages = 8 + (1 if cfg.tstr else 0)
    done = [0]

    def step() -> None:
        done[0] += 1
        if progress:
            progress(done[0], stages)

    manifest = cohort.manifest().sort_values("sample_id").reset_index(drop=True)
    syn = load_cohort_images(cohort, manifest)
    check_compatible(cohort, manifest, dataset, syn)
    train = load_images(dataset.shard_uris("train"))
    val = load_images(dataset.shard_uris("val"))
    if len(train) < 2 or len(val) < 2:
        raise MeddiffError(f"{dataset.uri} needs ≥ 2 train and val images for the baseline")
    step()

    class_names = dataset.class_names
    present = [c for c in range(len(class_names)) if (syn.y == c).any()]
    warnings: list[str] = []
    missing = [class_names[c] for c in range(len(class_names)) if c not in present]
    if missing:
        warnings.append(f"no synthetic images for classes {missing}: they are not evaluated")

    # --- domain classifier: features for every image, label oracle
    domain = load_or_train_domain(dataset, cfg.domain, device, cfg.cache_root)
    feats: dict[str, dict[str, torch.Tensor]] = {}
    d_syn, p_syn = domain.features_and_probs(syn.x)
    d_tr, _ = domain.features_and_probs(train.x)
    d_va, p_va = domain.features_and_probs(val.x)
    step()

    # --- feature sets for the distribution metrics (Inception on a seeded subsample)
    rng = np.random.default_rng(cfg.seed)
    sub = {"syn": subsample(len(syn), cfg.max_images, rng), "train": subsample(len(train), cfg.max_images, rng),
           "val": subsample(len(val), cfg.max_images, rng)}
    extractor_info: dict[str, Any] = {
        "domain": {"dim": domain.dim, "val_accuracy": domain.val_accuracy, "train": cfg.domain.__dict__,
                   "cache_uri": domain_cache_uri(dataset.uri, cfg.domain, cfg.cache_root),
                   "images": "all", "role": "label oracle, memorization features" +
                   (", distribution metrics" if "domain" in cfg.features else "")}}
    if "domain" in cfg.features:
        feats["domain"] = {"syn": d_syn, "train": d_tr, "val": d_va}
    if "inception" in cfg.features:
        inc = load_inception(device)
        feats["inception"] = {"syn": inc(syn.x[sub["syn"]]), "train": inc(train.x[sub["train"]]),
                              "val": inc(val.x[sub["val"]])}
        extractor_info["inception"] = {"dim": inc.dim, "weights": inc.weights.kind, "weights_path": inc.weights.path,
                                       "resize": "bilinear to 299×299, grayscale replicated to 3 channels",
                                       "images": {k: int(len(v)) for k, v in sub.items()}}
    if domain.val_accuracy is not None and domain.val_accuracy < 0.5:
        warnings.append(f"domain classifier validation accuracy is only {domain.val_accuracy:.2f}: "
                        "label fidelity and domain features are weak")
    step()

    # --- distribution metrics, overall and per class, synthetic vs train and val vs train
    metrics: list[dict[str, Any]] = []
    for name, f in feats.items():
        idx = {k: (np.arange(len(v)) if name == "domain" else sub[k]) for k, v in
               {"syn": syn.y, "train": train.y, "val": val.y}.items()}
        ys = {"syn": syn.y[idx["syn"]], "train": train.y[idx["train"]], "val": val.y[idx["val"]]}
        scopes: list[tuple[str, Any]] = [("overall", None)] + [(class_names[c], c) for c in present]
        for si, (scope, c) in enumerate(scopes):
            sel = {k: torch.as_tensor(ys[k] == c) if c is not None else torch.ones(len(ys[k]), dtype=torch.bool)
                   for k in ys}
            real = f["train"][sel["train"]]
            radii = fidelity.knn_radii(real, cfg.knn_k) if len(real) > cfg.knn_k else None
            s = set_metrics(real, f["syn"][sel["syn"]], name, scope, cfg, cfg.seed + si, radii)
            b = set_metrics(real, f["val"][sel["val"]], name, scope, cfg, cfg.seed + si, radii)
            metrics += paired(s, b)
    step()

    # --- pixel space: nearest training image (RMSE), SSIM to it, intra-class diversity
    x_syn, x_tr, x_va = (torch.from_numpy(a.x).float().div_(255) for a in (syn, train, val))
    pix_syn, nn_syn = memorization.pixel_rmse_nearest(x_syn, x_tr)
    pix_va, nn_va = memorization.pixel_rmse_nearest(x_va, x_tr)
    ssim_syn = similarity.ssim_pairs(x_syn, x_tr[nn_syn])
    ssim_va = similarity.ssim_pairs(x_va, x_tr[nn_va])
    scopes = [("overall", None)] + [(class_names[c], c) for c in present]
    pix_records: list[dict[str, Any]] = []
    base_records: list[dict[str, Any]] = []
    div_syn_all, div_tr_all = [], []
    for si, (scope, c) in enumerate(scopes):
        ms = torch.as_tensor(syn.y == c) if c is not None else torch.ones(len(syn), dtype=torch.bool)
        mv = torch.as_tensor(val.y == c) if c is not None else torch.ones(len(val), dtype=torch.bool)
        pix_records.append(mean_record("ssim_to_nearest_train", "pixel", scope, ssim_syn[ms], len(train), cfg, si))
        base_records.append(mean_record("ssim_to_nearest_train", "pixel", scope, ssim_va[mv], len(train), cfg, si))
        if c is None:
            continue
        d_s = similarity.pairwise_ssim(x_syn[ms], cfg.ssim_pairs, cfg.seed + si)
        d_t = similarity.pairwise_ssim(x_tr[torch.as_tensor(train.y == c)], cfg.ssim_pairs, cfg.seed + si)
        div_syn_all.append(d_s)
        div_tr_all.append(d_t)
        pix_records.append(mean_record("intra_class_ssim", "pixel", scope, d_s, None, cfg, si, unit="pairs"))
        base_records.append(mean_record("intra_class_ssim", "pixel", scope, d_t, None, cfg, si, unit="pairs"))
    pix_records.insert(1, mean_record("intra_class_ssim", "pixel", "overall", torch.cat(div_syn_all), None, cfg, 0,
                                      unit="pairs"))
    base_records.insert(1, mean_record("intra_class_ssim", "pixel", "overall", torch.cat(div_tr_all), None, cfg, 0,
                                       unit="pairs"))
    metrics += [{**r, "baseline_kind": "train" if r["metric"] == "intra_class_ssim" else "val-vs-train"}
                for r in paired(pix_records, base_records)]
    ms_ssim_note = ({"computed": False, "reason": f"images are {syn.x.shape[-1]} px; the standard 5-scale MS-SSIM "
                     f"needs ≥ {similarity.MS_SSIM_MIN_SIZE} px, so SSIM is reported instead"}
                    if syn.x.shape[-1] < similarity.MS_SSIM_MIN_SIZE else {"computed": True})
    if ms_ssim_note["computed"]:
        for si, (scope, c) in enumerate(scopes[1:]):
            ms = torch.as_tensor(syn.y == c)
            i, j = similarity.random_pairs(int(ms.sum()), min(cfg.ssim_pairs, 200), torch.Generator().manual_seed(si))
            v = similarity.ms_ssim_pairs(x_syn[ms][i], x_syn[ms][j])
            metrics.append({**mean_record("intra_class_ms_ssim", "pixel", scope, v, None, cfg, si), "baseline": None})
    step()

    # --- label fidelity: the oracle's accuracy on the intended classes
    y_syn, y_va = torch.tensor(syn.y), torch.tensor(val.y)
    correct_syn = p_syn.argmax(1) == y_syn
    correct_va = p_va.argmax(1) == y_va
    lf, lb = [], []
    for si, (scope, c) in enumerate(scopes):
        ms = y_syn == c if c is not None else torch.ones(len(y_syn), dtype=torch.bool)
        mv = y_va == c if c is not None else torch.ones(len(y_va), dtype=torch.bool)
        lf.append(mean_record("label_fidelity", "domain", scope, correct_syn[ms], None, cfg, si))
        lb.append(mean_record("label_fidelity", "domain", scope, correct_va[mv], None, cfg, si))
    metrics += paired(lf, lb)
    step()

    # --- memorization: nearest training image in domain-feature and pixel space
    fd_syn, fnn_syn = memorization.nearest(d_syn, d_tr)
    fd_va, _ = memorization.nearest(d_va, d_tr)
    thr_f = memorization.threshold(fd_va, cfg.memorization_quantile)
    thr_p = memorization.threshold(pix_va, cfg.memorization_quantile)
    flags = memorization.flag(fd_syn, pix_syn, thr_f, thr_p, cfg.flag_rule)
    flags_va = memorization.flag(fd_va, pix_va, thr_f, thr_p, cfg.flag_rule)
    mf, mb = [], []
    for si, (scope, c) in enumerate(scopes):
        ms = y_syn == c if c is not None else torch.ones(len(y_syn), dtype=torch.bool)
        mv = y_va == c if c is not None else torch.ones(len(y_va), dtype=torch.bool)
        mf.append(mean_record("flagged_fraction", "domain+pixel", scope, flags[ms], len(train), cfg, si))
        mb.append(mean_record("flagged_fraction", "domain+pixel", scope, flags_va[mv], len(train), cfg, si))
    metrics += paired(mf, mb)
    order = np.lexsort((pix_syn.numpy(), ~flags.numpy()))[: cfg.closest_pairs]  # flagged first, then closest
    pairs = [{"sample_id": int(manifest["sample_id"][i]), "key": syn.keys[i], "class_name": class_names[syn.y[i]],
              "real_key": train.keys[int(nn_syn[i])], "pixel_rmse": float(pix_syn[i]),
              "feature_distance": float(fd_syn[i]), "flagged": bool(flags[i]),
              "ssim": float(ssim_syn[i])} for i in order]
    memo = {"feature_extractor": "domain", "pixel_distance": "RMSE in [0, 1]", "rule": cfg.flag_rule,
            "quantile": cfg.memorization_quantile, "thresholds": {"feature": thr_f, "pixel": thr_p},
            "threshold_source": f"{cfg.memorization_quantile:g} quantile of real val→train nearest distances "
                                f"({len(val)} val images)",
            "flagged": int(flags.sum()), "n": len(syn),
            "flagged_by_class": {class_names[c]: int(flags[y_syn == c].sum()) for c in present},
            "closest_pairs": pairs}
    quality = pd.DataFrame({
        "nearest_real_distance": fd_syn.double().numpy(),
        "nearest_real_pixel_distance": pix_syn.double().numpy(),
        "nearest_real_key": [train.keys[int(i)] for i in nn_syn],
        "oracle_prob": p_syn[torch.arange(len(y_syn)), y_syn].double().numpy(),
        "flagged": flags.numpy().astype(bool),
    }, index=pd.Index(manifest["sample_id"].to_numpy(), name="sample_id"))
    step()

    # --- utility: train on synthetic, test on real
    tstr = None
    if cfg.tstr:
        tstr = run_tstr(dataset, x_syn, y_syn, flags, x_tr, torch.as_tensor(train.y), cfg, device, warnings)
        step()

    headline = make_headline(metrics, memo, tstr, cfg.features)
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in metrics:
        if r.get("warning") and r["scope"] == "overall":
            grouped.setdefault((r["extractor"], r["warning"]), []).append(r["metric"])
    warnings += [f"{', '.join(names)} ({ext}): {w}" for (ext, w), names in grouped.items()]
    n_class_warn = sum(1 for r in metrics if r.get("warning") and r["scope"] != "overall")
    if n_class_warn:
        warnings.append(f"{n_class_warn} per-class metric values carry a small-sample warning (see the metric table)")
    model_uri = cohort.card.get("model_uri")
    report = make_record(
        "evaluation-report", cfg, {"cohort_uri": cohort.uri, "dataset_uri": dataset.uri, "model_uri": model_uri},
        report_schema_version=REPORT_SCHEMA_VERSION, config_hash=chash, device=device,
        cohort={"n": len(syn), "counts": {class_names[c]: int((syn.y == c).sum()) for c in present},
                "image_size": int(syn.x.shape[-1]), "channels": int(syn.x.shape[1])},
        real={"train": len(train), "val": len(val)},
        extractors=extractor_info, headline=headline, metrics=metrics, memorization=memo, tstr=tstr,
        ms_ssim=ms_ssim_note, drop_flagged=cfg.drop_flagged,
        baseline="real validation split vs real training split (intra-class SSIM: among real training images)",
        warnings=warnings)

    html = render_html(report, syn, train, nn_syn, order, class_names, cfg.grid_per_class, model_uri)
    report["html"] = {"file": REPORT_HTML, "sha256": sha256_bytes(html)}
    storage.write_bytes(storage.join(cohort.uri, REPORT_HTML), html)
    write_quality(cohort.uri, quality)
    storage.write_json(report_uri, report)  # last: the report is complete when report.json exists
    step()
    return EvalResult(report_uri, report)


def run_tstr(dataset: DatasetVersion, x_syn: torch.Tensor, y_syn: torch.Tensor, flags: torch.Tensor,
             x_tr: torch.Tensor, y_tr: torch.Tensor, cfg: EvalConfig, device: str,
             warnings: list[str]) -> dict[str, Any] | None:
    from meddiff.evaluate.tstr import run_setting

    test = load_images(dataset.shard_uris("test"))
    if len(test) < 2:
        warnings.append("TSTR skipped: the real test split is empty")
        return None
    x_te, y_te = torch.from_numpy(test.x).float().div_(255), torch.as_tensor(test.y)
    keep = ~flags if cfg.drop_flagged else torch.ones(len(flags), dtype=torch.bool)
    xs, ys = x_syn[keep], y_syn[keep]
    sets = {"real": (x_tr, y_tr), "synthetic": (xs, ys), "real+synthetic": (torch.cat([x_tr, xs]), torch.cat([y_tr, ys]))}
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for name, (x, y) in sets.items():
        keep_idx = torch.as_tensor(subsample(len(x), cfg.tstr_max_images, rng))
        x, y = x[keep_idx], y[keep_idx]
        if len(x) < 2:
            warnings.append(f"TSTR setting {name} skipped: {len(x)} training images")
            continue
        r = run_setting(name, x, y, x_te, y_te, dataset.num_classes, cfg.tstr_epochs, cfg.seed, device)
        rows.append(r.__dict__)
    return {"model": "resnet18 (torchvision, random init, 28 px stem per MedMNIST v2)", "epochs": cfg.tstr_epochs,
            "test_split": "real test", "synthetic_excludes_flagged": cfg.drop_flagged,
            "max_train_images": cfg.tstr_max_images, "settings": rows}
