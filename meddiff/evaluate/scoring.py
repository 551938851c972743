"""``evaluate_images(syn, real, cfg, ...)``: every metric of a set of images against real data, as
named steps, with no I/O — the cohort report (report.py) and calibration (calibrate.py) both call it.

Scopes are "overall" and each class present in the synthetic set. Every number sits beside its
real baseline computed the same way: set metrics at a matched n against two references (the
training split and the held-out split), per-sample means against the real validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from meddiff.errors import MeddiffError
from meddiff.evaluate import bootstrap, matched, memorization, similarity
from meddiff.evaluate.config import EvalConfig
from meddiff.evaluate.features import PREPROCESSING, DomainExtractor
from meddiff.evaluate.loading import Images, RealSplits
from meddiff.evaluate.summary import make_headline, small_sample
from meddiff.evaluate.verdicts import overall


@dataclass
class Evaluation:
    """What ``evaluate_images`` found: the report body and the per-image results."""
    body: dict[str, Any]  # metrics, headline, verdict, memorization, tstr, extractors, warnings, ...
    nearest_feature: torch.Tensor  # N: domain-feature distance to the nearest training image
    nearest_pixel: torch.Tensor  # N: pixel RMSE to the nearest training image (mirrors included)
    nearest_index: np.ndarray  # N: index into train (≥ len(train): the mirrored image)
    oracle_prob: torch.Tensor  # N: the domain classifier's probability of the intended class
    flags: torch.Tensor  # N bool: flagged as a copy
    order: np.ndarray  # the closest pairs shown in the report (flagged first)
    umap_png: bytes | None = None  # report.html's UMAP of real (held-out) vs synthetic domain features
    oracle_class: np.ndarray | None = None  # N: the domain classifier's predicted class


def _scopes(syn: Images, class_names: list[str]) -> list[tuple[str, int | None]]:
    return [("overall", None)] + [(class_names[c], c) for c in range(len(class_names)) if (syn.y == c).any()]


def unmatched_classes(syn_y: np.ndarray, real: RealSplits, class_names: list[str], heldout_split: str,
                      mixed: bool) -> list[str]:
    """A warning for each real split lacking classes the cohort has (a rare class of a small folder dataset
    can get no val image): its per-class comparisons against that split are skipped and, with the cohort's
    class mix drawn (``mixed``), the overall set metrics leave that class's synthetic images out."""
    out = []
    for split, y in (("val", real.val.y), ("train", real.train.y), (heldout_split, real.heldout.y)):
        lack = [c for c in range(len(class_names)) if (syn_y == c).any() and not (y == c).any()]
        if not lack:
            continue
        n = int(np.isin(syn_y, lack).sum())
        against = "" if split == "val" else " against it"  # val is every set metric's baseline
        overall = (f"the overall set metrics (KID, FID, precision, recall, coverage){against} leave out its {n} "
                   "synthetic images of them" if mixed else "")
        flag = {"val": "--val-frac", heldout_split: "--test-frac"}.get(split)  # zip/folder/Kaggle ingests
        out.append(f"the real {split} split has no images of {', '.join(class_names[c] for c in lack)}: "
                   f"{overall}{' and ' if overall else ''}their per-class comparisons with it are skipped"
                   + (f" (re-ingest with a larger {flag} for them to be judged)" if flag else ""))
    return out


def _mask(y: np.ndarray, c: int | None) -> torch.Tensor:
    return torch.ones(len(y), dtype=torch.bool) if c is None else torch.as_tensor(y == c)


def _base(y: np.ndarray, c: int | None, mix: np.ndarray | None, seed: int) -> torch.Tensor:
    """The real baseline samples (labels ``y``) beside scope ``c``: its class; overall, all of them or, given
    the cohort's intended classes ``mix``, the largest subsample with the cohort's class mix (a cohort of
    50 per class is not compared with real data of another mix: that alone failed real images' KID)."""
    if c is not None or mix is None:
        return _mask(y, c)
    return torch.as_tensor(matched.mixed_like(y, mix, np.random.default_rng(seed)))


# the range of each per-sample value (intervals are clipped to it): fractions of 0/1 flags, SSIMs
MEAN_RANGE = {"closer_to_train": (0.0, 1.0), "flagged_fraction": (0.0, 1.0), "label_fidelity": (0.0, 1.0),
              "ssim_to_nearest_train": (-1.0, 1.0), "intra_class_ssim": (-1.0, 1.0)}


def mean_record(metric: str, extractor: str, scope: str, values: torch.Tensor, cfg: EvalConfig,
                **extra: Any) -> dict[str, Any]:
    """A metric that is the mean of per-sample values, with its closed-form 95 % interval."""
    n = len(values)
    if n < 1:
        return {"metric": metric, "extractor": extractor, "scope": scope, "value": None, "n": 0, "ci": None,
                "warning": "skipped: no samples", **extra}
    v = values.double()
    if not torch.isfinite(v).all():
        return {"metric": metric, "extractor": extractor, "scope": scope, "value": None, "n": n, "ci": None,
                "warning": "skipped: non-finite values", **extra}
    ci = bootstrap.mean_ci(v.numpy(), 1)
    if ci:
        lo, hi = MEAN_RANGE.get(metric, (-np.inf, np.inf))
        ci = (max(lo, ci[0]), min(hi, ci[1]))
    return {"metric": metric, "extractor": extractor, "scope": scope, "value": float(v.mean()), "n": n,
            "ci": list(ci) if ci else None, "warning": bootstrap.small_n_warning(n, cfg.min_n, "computed"), **extra}


def paired_means(syn: list[dict[str, Any]], base: list[dict[str, Any]], baseline_kind: str) -> list[dict[str, Any]]:
    """Attach each baseline mean record to its synthetic twin, with the difference and its interval."""
    out = []
    for s, b in zip(syn, base):
        lo, hi = MEAN_RANGE.get(s["metric"], (-np.inf, np.inf))
        diff = matched.mean_difference(s["value"], s["ci"], b["value"], b["ci"], span=hi - lo)
        out.append({**s, "reference": s.get("reference", "-"), "baseline_kind": baseline_kind, "difference": diff,
                    "baseline": {k: b.get(k) for k in ("value", "n", "ci", "warning")}})
    return out


# --------------------------------------------------------------------------- step 1: features

def extract_features(syn: Images, real: RealSplits, cfg: EvalConfig, domain: DomainExtractor,
                     inception: Callable | None, oracle_labels: bool = False, real_inception: Callable | None = None
                     ) -> tuple[Images, dict[str, dict[str, torch.Tensor]], dict[str, Any], dict]:
    """``syn`` (relabelled by the oracle when ``oracle_labels``), features per extractor and set
    (syn/train/val/heldout), domain probabilities, extractor info.

    Inception runs on a seeded subsample of at most ``cfg.max_images`` per set (its labels in ``ys``);
    ``real_inception`` (default ``inception``) embeds the real sets, e.g. through a cache."""
    dom = {"syn": domain.features_and_probs(syn.x)}
    if oracle_labels:  # an unconditional cohort has no intended classes: the oracle's stand in for scopes
        syn = Images(syn.x, dom["syn"][1].argmax(1).numpy().astype(np.int64), syn.keys)
    sets = {"syn": syn, "train": real.train, "val": real.val, "heldout": real.heldout}
    dom.update({k: domain.features_and_probs(v.x) for k, v in sets.items() if k != "syn"})
    feats = {"domain": {k: f for k, (f, _) in dom.items()}}
    ys = {"domain": {k: v.y for k, v in sets.items()}}
    info: dict[str, Any] = {"domain": {
        "dim": domain.dim, "val_accuracy": domain.val_accuracy, "images": "all",
        "role": "label oracle, memorization features" + (", distribution metrics" if "domain" in cfg.features else "")}}
    if inception is not None:
        rng = np.random.default_rng(cfg.seed)
        sub = {k: _subsample(len(v), cfg.max_images, rng) for k, v in sets.items()}
        if not oracle_labels and cfg.max_images:  # capped real sets drawn with the cohort's class mix, so the
            for k in ("train", "val", "heldout"):  # overall class-mix draw keeps them whole (300 of 300, not 126)
                if len(sets[k]) > cfg.max_images:
                    sub[k] = matched.mixed_like(sets[k].y, syn.y[sub["syn"]], rng, most=cfg.max_images)
        embed = {"syn": inception} | dict.fromkeys(("train", "val", "heldout"), real_inception or inception)
        feats["inception"] = {k: embed[k](sets[k].x[i]) for k, i in sub.items()}
        ys["inception"] = {k: sets[k].y[i] for k, i in sub.items()}
        info["inception"] = {"dim": inception.dim, "weights": inception.weights.kind,
                             "weights_path": inception.weights.path,
                             "preprocessing": PREPROCESSING[inception.weights.kind],
                             "images": {k: int(len(i)) for k, i in sub.items()}}
    probs = {"syn": dom["syn"][1], "val": dom["val"][1], "heldout": dom["heldout"][1]}
    return syn, feats, {"ys": ys, "probs": probs}, info


def _subsample(n: int, max_n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most max_n of n items (all when max_n is None or ≥ n)."""
    if max_n is None or n <= max_n:
        return np.arange(n)
    return np.sort(rng.choice(n, max_n, replace=False))


# --------------------------------------------------------------------------- step 2: distribution metrics

def distribution_metrics(feats: dict[str, dict[str, torch.Tensor]], ys: dict[str, dict[str, np.ndarray]],
                         scopes: list[tuple[str, int | None]], cfg: EvalConfig, match_mix: bool = True
                         ) -> list[dict[str, Any]]:
    """Set metrics per extractor × reference (train, held-out) × scope, each at its matched n; overall, with
    ``match_mix`` (intended classes), baseline and reference drawn with the cohort's class mix."""
    out: list[dict[str, Any]] = []
    for name in cfg.features:
        f, y = feats[name], ys[name]
        for reference, ref_key in (("train", "train"), ("heldout", "heldout")):
            for si, (scope, c) in enumerate(scopes):
                out += matched.compare(
                    f["syn"][_mask(y["syn"], c)], f["val"][_mask(y["val"], c)], f[ref_key][_mask(y[ref_key], c)],
                    extractor=name, scope=scope, reference=reference, k=cfg.knn_k, min_n=cfg.min_n,
                    reliable_n=cfg.reliable_n, cap=None, seed=cfg.seed + si,
                    resamples=cfg.interval_resamples if c is None or cfg.class_intervals else 0,
                    labels=(y["syn"], y["val"], y[ref_key]) if c is None and match_mix else None)
    return out


def authenticity(feats: dict[str, torch.Tensor], syn_y: np.ndarray, val_y: np.ndarray, train_y: np.ndarray,
                 held_y: np.ndarray, scopes: list[tuple[str, int | None]], cfg: EvalConfig,
                 match_mix: bool = True) -> list[dict[str, Any]]:
    """The two-reference gap: the fraction of images whose nearest neighbour (domain features) lies in
    the training split rather than the held-out split, each reference used whole (a copy's source
    is always there). The larger training split wins more often for any image; the real val baseline,
    scored the same way, carries the same bias. A memorizer is nearer to train far more often."""
    syn_recs, base_recs = [], []
    for scope, c in scopes:
        tr, he = feats["train"][_mask(train_y, c)], feats["heldout"][_mask(held_y, c)]
        vals = {}
        for key, sel in (("syn", _mask(syn_y, c)), ("val", _base(val_y, c, syn_y if match_mix else None, cfg.seed))):
            q = feats[key][sel]
            if len(tr) == 0 or len(he) == 0 or len(q) == 0:
                vals[key] = torch.zeros(0)
                continue
            vals[key] = (memorization.nearest(q, tr)[0] < memorization.nearest(q, he)[0]).float()
        extra = {"reference": "train vs heldout", "n_ref": [len(tr), len(he)]}
        syn_recs.append(mean_record("closer_to_train", "domain", scope, vals["syn"], cfg, **extra))
        base_recs.append(mean_record("closer_to_train", "domain", scope, vals["val"], cfg, **extra))
    return paired_means(syn_recs, base_recs, "val")


# --------------------------------------------------------------------------- step 3: memorization

def memorization_step(syn: Images, real: RealSplits, d_syn: torch.Tensor, d_val: torch.Tensor,
                      d_train: torch.Tensor, d_train_mirror: torch.Tensor | None, cfg: EvalConfig) -> dict[str, Any]:
    """Nearest training image of every synthetic (and baseline val) image in domain-feature and pixel
    space — mirrored training images included when ``cfg.mirror_copies`` — and the flags."""
    ref_f = torch.cat([d_train, d_train_mirror]) if d_train_mirror is not None else d_train
    fd_syn, fi_syn = memorization.nearest(d_syn, ref_f)
    fd_va, _ = memorization.nearest(d_val, ref_f)
    pd_syn, pi_syn = memorization.pixel_rmse_nearest(syn.x, real.train.x, mirror=cfg.mirror_copies)
    pd_va, pi_va = memorization.pixel_rmse_nearest(real.val.x, real.train.x, mirror=cfg.mirror_copies)
    thr_f = memorization.threshold(fd_va, cfg.memorization_quantile)
    thr_p = max(memorization.threshold(pd_va, cfg.memorization_quantile),
                cfg.copy_ratio * memorization.threshold(pd_va, 0.5))
    return {"fd_syn": fd_syn, "fd_va": fd_va, "pd_syn": pd_syn, "pd_va": pd_va, "pi_syn": pi_syn.numpy(),
            "pi_va": pi_va.numpy(),             "thr_f": thr_f, "thr_p": thr_p,
            "flags": memorization.flag(fd_syn, pd_syn, thr_f, thr_p, cfg.flag_rule),
            "flags_va": memorization.flag(fd_va, pd_va, thr_f, thr_p, cfg.flag_rule)}


def gather_nearest(train_x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """uint8 training images at ``idx`` (idx ≥ len(train): that image mirrored left–right)."""
    m = len(train_x)
    out = train_x[idx % m]
    mir = idx >= m
    out[mir] = out[mir][..., ::-1]
    return out


def ssim_to_nearest(x: np.ndarray, train_x: np.ndarray, idx: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """SSIM of each uint8 image (N, C, H, W) with its nearest training image (``gather_nearest``), gathered
    chunk by chunk: a 100k-image cohort never holds a second full copy of itself. → (N,)"""
    out = [similarity.ssim_pairs(x[i:i + chunk], gather_nearest(train_x, idx[i:i + chunk]))
           for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.zeros(0)


def memorization_records(mem: dict[str, Any], syn: Images, real: RealSplits,
                         scopes: list[tuple[str, int | None]], cfg: EvalConfig, match_mix: bool = True
                         ) -> list[dict[str, Any]]:
    mix = syn.y if match_mix else None
    syn_r = [mean_record("flagged_fraction", "domain+pixel", s, mem["flags"][_mask(syn.y, c)], cfg,
                         n_ref=len(real.train)) for s, c in scopes]
    base_r = [mean_record("flagged_fraction", "domain+pixel", s, mem["flags_va"][_base(real.val.y, c, mix, cfg.seed)],
                          cfg, n_ref=len(real.train)) for s, c in scopes]
    return paired_means(syn_r, base_r, "val")


# --------------------------------------------------------------------------- step 4: pixel space

def pixel_metrics(syn: Images, real: RealSplits, mem: dict[str, Any], scopes: list[tuple[str, int | None]],
                  cfg: EvalConfig, match_mix: bool = True) -> list[dict[str, Any]]:
    """SSIM to the nearest training image (syn vs val baseline) and intra-class SSIM (syn vs train pairs)."""
    mix = syn.y if match_mix else None
    ssim_syn = ssim_to_nearest(syn.x, real.train.x, mem["pi_syn"])
    ssim_va = ssim_to_nearest(real.val.x, real.train.x, mem["pi_va"])
    near_s = [mean_record("ssim_to_nearest_train", "pixel", s, ssim_syn[_mask(syn.y, c)], cfg) for s, c in scopes]
    near_b = [mean_record("ssim_to_nearest_train", "pixel", s, ssim_va[_base(real.val.y, c, mix, cfg.seed)], cfg)
              for s, c in scopes]
    div_s, div_t = [], []
    for si, (_, c) in enumerate(scopes[1:]):
        div_s.append(similarity.pairwise_ssim(syn.x[syn.y == c], cfg.ssim_pairs, cfg.seed + si))
        div_t.append(similarity.pairwise_ssim(real.train.x[real.train.y == c], cfg.ssim_pairs, cfg.seed + si))
    per_s = [torch.cat(div_s)] + div_s
    per_t = [torch.cat(div_t)] + div_t
    ds = [mean_record("intra_class_ssim", "pixel", s, v, cfg, unit="pairs") for (s, _), v in zip(scopes, per_s)]
    dt = [mean_record("intra_class_ssim", "pixel", s, v, cfg, unit="pairs") for (s, _), v in zip(scopes, per_t)]
    return paired_means(near_s, near_b, "val") + paired_means(ds, dt, "train pairs")


def ms_ssim_step(syn: Images, scopes: list[tuple[str, int | None]], cfg: EvalConfig
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Intra-class MS-SSIM when images are large enough for its 5 scales, else the reason it is not."""
    size = syn.x.shape[-1]
    if size < similarity.MS_SSIM_MIN_SIZE:
        return {"computed": False, "reason": f"images are {size} px; the standard 5-scale MS-SSIM needs "
                f"≥ {similarity.MS_SSIM_MIN_SIZE} px, so SSIM is reported instead"}, []
    recs = []
    for si, (scope, c) in enumerate(scopes[1:]):
        x = syn.x[syn.y == c]
        i, j = similarity.random_pairs(len(x), min(cfg.ssim_pairs, 200), torch.Generator().manual_seed(si))
        v = similarity.ms_ssim_pairs(similarity._f(x[i.numpy()]), similarity._f(x[j.numpy()]))
        recs.append({**mean_record("intra_class_ms_ssim", "pixel", scope, v, cfg), "baseline": None})
    return {"computed": True}, recs


def label_fidelity(syn: Images, real: RealSplits, probs: dict[str, torch.Tensor],
                   scopes: list[tuple[str, int | None]], cfg: EvalConfig) -> list[dict[str, Any]]:
    """The oracle's accuracy on the intended classes: synthetic vs every real image the generator never
    saw (val + held-out pooled: the largest unseen sample, robust to one split being easier)."""
    ok_s = probs["syn"].argmax(1) == torch.as_tensor(syn.y)
    y_b = np.concatenate([real.val.y, real.heldout.y])
    ok_b = torch.cat([probs["val"], probs["heldout"]]).argmax(1) == torch.as_tensor(y_b)
    s = [mean_record("label_fidelity", "domain", sc, ok_s[_mask(syn.y, c)], cfg) for sc, c in scopes]
    b = [mean_record("label_fidelity", "domain", sc, ok_b[_base(y_b, c, syn.y, cfg.seed)], cfg) for sc, c in scopes]
    return paired_means(s, b, "val + heldout")


def memo_summary(mem: dict[str, Any], syn: Images, real: RealSplits, class_names: list[str],
                 scopes: list[tuple[str, int | None]], cfg: EvalConfig
                 ) -> tuple[dict[str, Any], np.ndarray]:
    """The report's memorization section and the order of the closest pairs (flagged first)."""
    flags, pd_syn, pi = mem["flags"], mem["pd_syn"], mem["pi_syn"]
    order = np.lexsort((pd_syn.numpy(), ~flags.numpy()))[: cfg.closest_pairs]
    m = len(real.train)
    pairs = [{"index": int(i), "key": syn.keys[i], "class_name": class_names[syn.y[i]],
              "real_key": real.train.keys[int(pi[i]) % m], "mirrored": bool(pi[i] >= m),
              "pixel_rmse": float(pd_syn[i]), "feature_distance": float(mem["fd_syn"][i]),
              "flagged": bool(flags[i])} for i in order]
    memo = {"feature_extractor": "domain", "pixel_distance": "RMSE in [0, 1]", "rule": cfg.flag_rule,
            "mirror_copies": cfg.mirror_copies, "quantile": cfg.memorization_quantile,
            "thresholds": {"feature": mem["thr_f"], "pixel": mem["thr_p"]},
            "threshold_source": f"{cfg.memorization_quantile:g} quantile of real val→train nearest distances "
                                f"({len(real.val)} val images; pixel: at least {cfg.copy_ratio:g} × their median)",
            "flagged": int(flags.sum()), "n": len(syn), "flagged_mirrored": int((flags & (torch.as_tensor(pi) >= m)).sum()),
            "flagged_by_class": {s: int(flags[_mask(syn.y, c)].sum()) for s, c in scopes[1:]},
            "closest_pairs": pairs}
    return memo, order


# --------------------------------------------------------------------------- the whole evaluation

def evaluate_images(syn: Images, real: RealSplits, cfg: EvalConfig, class_names: list[str],
                    domain: DomainExtractor, inception: Callable | None = None,
                    step: Callable[[], None] = lambda: None, tstr: Callable | None = None,
                    oracle_labels: bool = False, real_inception: Callable | None = None) -> Evaluation:
    """Every metric of ``syn`` against ``real`` (no I/O). ``step`` is called after each stage;
    ``tstr(syn, real, flags, warnings) -> dict | None`` runs the utility check when given.

    ``oracle_labels`` (unconditional cohorts, ``syn.y`` all -1): the domain classifier's predicted
    classes define the per-class scopes; label fidelity (circular then) and TSTR are not computed, and
    the oracle's class mix is compared with the real one instead."""
    syn, feats, aux, info = extract_features(syn, real, cfg, domain, inception, oracle_labels, real_inception)
    scopes = _scopes(syn, class_names)
    missing = [n for n in class_names if n not in dict(scopes)]
    warnings = [f"no synthetic images {'the oracle assigns to' if oracle_labels else 'for'} classes {missing}: "
                "they are not evaluated"] if missing else []
    mixed = not oracle_labels  # the cohort's class mix was chosen (unconditional: the generator's own, judged)
    warnings += unmatched_classes(syn.y, real, class_names, cfg.heldout_split, mixed)
    step()
    metrics = distribution_metrics(feats, aux["ys"], scopes, cfg, mixed)
    d = feats["domain"]
    metrics += authenticity(d, syn.y, real.val.y, real.train.y, real.heldout.y, scopes, cfg, mixed)
    step()
    mirror = domain.mirrored(real.train.x) if cfg.mirror_copies else None
    mem = memorization_step(syn, real, d["syn"], d["val"], d["train"], mirror, cfg)
    metrics += memorization_records(mem, syn, real, scopes, cfg, mixed)
    step()
    metrics += pixel_metrics(syn, real, mem, scopes, cfg, mixed)
    if not oracle_labels:
        metrics += label_fidelity(syn, real, aux["probs"], scopes, cfg)
    ms_note, ms_recs = ms_ssim_step(syn, scopes, cfg)
    metrics += ms_recs
    step()
    memo, order = memo_summary(mem, syn, real, class_names, scopes, cfg)
    if tstr and oracle_labels:
        warnings.append("TSTR not run: an unconditional cohort has no intended labels to train a classifier on")
        tstr = None
    tstr_result = tstr(syn, real, mem["flags"], warnings) if tstr else None
    if tstr:
        step()
    headline = make_headline(metrics, tstr_result, cfg.features)
    warnings += _grouped_warnings(metrics)
    if domain.val_accuracy is not None and domain.val_accuracy < 0.5:
        warnings.append(f"domain classifier validation accuracy is only {domain.val_accuracy:.2f}: "
                        "label fidelity and domain features are weak")
    body = {"verdict": overall({k: v.get("verdict") for k, v in headline.items() if isinstance(v, dict)},
                               small_sample(headline, cfg.reliable_n)),
            "headline": headline, "metrics": metrics, "memorization": memo, "tstr": tstr_result,
            "extractors": info, "warnings": warnings, "ms_ssim": ms_note,
            "labels": ("oracle: an unconditional cohort (no class asked); per-class scopes use the domain "
                       "classifier's predicted class" if oracle_labels else "intended: the class each image was asked for"),
            "class_mix": class_mix(syn.y, real.train.y, class_names),
            "cohort": {"n": len(syn), "counts": {s: int((syn.y == c).sum()) for s, c in scopes[1:]},
                       "image_size": int(syn.x.shape[-1]), "channels": int(syn.x.shape[1])},
            "real": {"train": len(real.train), "val": len(real.val), cfg.heldout_split: len(real.heldout)},
            "baseline": "real validation images (never seen by the generator) scored exactly like the cohort: "
                        "set metrics at the same n against the same reference subsample; "
                        + ("overall, baseline and reference drawn with the cohort's class mix; " if mixed else "")
                        + "intra-class SSIM: pairs of real training images of the same class",
            "references": {"train": "the generator's training split",
                           "heldout": f"the real {cfg.heldout_split} split (never seen by the generator)"}}
    png, body["umap"] = umap_step(d["syn"], syn.y, d["heldout"], real.heldout.y, class_names, cfg)
    if body["umap"].get("skipped"):
        warnings.append(f"UMAP plot skipped: {body['umap']['skipped']}")
    probs = aux["probs"]["syn"]
    return Evaluation(body, mem["fd_syn"], mem["pd_syn"], mem["pi_syn"],
                      probs[torch.arange(len(syn)), torch.as_tensor(syn.y)], mem["flags"], order, png,
                      probs.argmax(1).numpy())


def class_mix(syn_y: np.ndarray, train_y: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Each class's share of the cohort beside its share of the real training split (for an
    unconditional cohort: the classes the oracle sees in it against the prevalence it was trained on)."""
    k = len(class_names)
    syn_n = np.bincount(syn_y, minlength=k)[:k]
    real_n = np.bincount(train_y, minlength=k)[:k]
    return [{"class": class_names[c], "synthetic": round(float(syn_n[c] / max(len(syn_y), 1)), 4),
             "real_train": round(float(real_n[c] / max(len(train_y), 1)), 4)} for c in range(k)]


def umap_step(f_syn: torch.Tensor, y_syn: np.ndarray, f_real: torch.Tensor, y_real: np.ndarray,
              class_names: list[str], cfg: EvalConfig) -> tuple[bytes | None, dict[str, Any]]:
    """UMAP of domain features (N, D): at most ``cfg.umap_points`` synthetic and as many held-out real images
    (seeded subsamples), one panel per class; (PNG, record). A failure is recorded, never raised."""
    if cfg.umap_points == 0:
        return None, {"skipped": "umap_points = 0"}
    from meddiff.evaluate.umap_plot import umap_png  # umap-learn (numba) loads only when asked

    rng = np.random.default_rng(cfg.seed)
    i_syn, i_real = _subsample(len(f_syn), cfg.umap_points, rng), _subsample(len(f_real), cfg.umap_points, rng)
    rec = {"features": "domain", "real": f"{cfg.heldout_split} split", "n_synthetic": int(len(i_syn)),
           "n_real": int(len(i_real))}
    try:
        png = umap_png(f_real[i_real].numpy(), y_real[i_real], f_syn[i_syn].numpy(), y_syn[i_syn], class_names,
                       title=f"UMAP of domain features: real {cfg.heldout_split} (grey) vs synthetic", seed=cfg.seed)
    except MeddiffError as e:  # umap-learn missing, too few points: the report still renders
        return None, {**rec, "skipped": str(e)}
    return png, rec


def _grouped_warnings(metrics: list[dict[str, Any]]) -> list[str]:
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in metrics:
        if r.get("warning") and r["scope"] == "overall":
            grouped.setdefault((r["extractor"], r["warning"]), []).append(r["metric"])
    out = [f"{', '.join(dict.fromkeys(names))} ({ext}): {w}" for (ext, w), names in grouped.items()]
    n_class = sum(1 for r in metrics if r.get("warning") and r["scope"] != "overall")
    if n_class:
        out.append(f"{n_class} per-class metric values carry a small-sample warning (see the metric table)")
    return out
