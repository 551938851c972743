"""Anomaly detection with a diffusion model of the normal class: score every image of a real split by
how much a partial noise-and-denoise toward "normal" changes it, and report image-level AUROC.

Scores (higher = more anomalous): ``pixel`` — mean squared error between the image and its
reconstruction (label-free); ``feature`` — Euclidean distance between their domain-classifier features
(``meddiff.evaluate.features``; that classifier was trained with the training split's labels, the
anomaly classes included, so this score is not label-free); ``ratio`` (conditional models with a null
label) — the pixel error toward the normal label divided by the error of the unconditional (null-label)
reconstruction from the same noise, a likelihood-ratio score in the spirit of Ren et al. 2019
("Likelihood Ratios for Out-of-Distribution Detection"): how an image is reconstructed depends on its
texture and brightness as much as on its normality, and the ratio cancels what both models share.
Results live in
``<root>/anomaly/<id>/``: ``scores.parquet`` (one row per image), ``heatmaps.png`` (the most anomalous
images, their reconstructions and |x − x̂|), ``distributions.png`` (scores per class) and, last,
``anomaly.json`` (config, inputs, AUROC with 95 % bootstrap CIs). Same request → same folder, reused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from meddiff import storage
from meddiff.errors import MeddiffError, check_seed
from meddiff.figures import new_figure, to_png
from meddiff.progress import Progress, tell, told_only
from meddiff.records import content_hash, make_record
from meddiff.threads import configure_threads

SCORES = ("pixel", "feature", "ratio")  # "ratio" only for conditional models with a null label


@dataclass(frozen=True)
class AnomalyConfig:
    normal: str  # the normal class (name or 0-based id); every other class is an anomaly
    split: str = "test"  # the real split scored: train | val | test
    level: float = 0.3  # noise level λ ∈ (0, 1]: fraction of the chain (DDPM t* = λ(T−1); rflow s = λ)
    steps: int = 10  # deterministic denoising steps from λ back to 0
    guidance: float = 1.0  # conditional models: CFG scale toward the normal label (1 = plain conditional)
    max_images: int | None = 1000  # seeded, stratified-by-nothing subsample of the split (CPU budget); None = all
    batch_size: int = 64  # images per forward pass
    heatmaps: int = 12  # most anomalous images shown in heatmaps.png
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0  # noise and subsample seed

    def check(self) -> "AnomalyConfig":
        check_seed(self.seed)
        if self.split not in ("train", "val", "test"):
            raise MeddiffError(f"split must be train, val or test, not {self.split!r}")
        if not 0 < self.level <= 1:
            raise MeddiffError(f"--level must be in (0, 1], not {self.level}")
        if self.steps < 1 or self.batch_size < 1 or self.heatmaps < 0:
            raise MeddiffError("--steps and --batch-size must be ≥ 1, --heatmaps ≥ 0")
        if self.max_images is not None and self.max_images < 4:
            raise MeddiffError("--max-images must be ≥ 4 (or 0 for all)")
        if self.guidance < 0:
            raise MeddiffError(f"--guidance must be ≥ 0, not {self.guidance}")
        return self


def class_id(name: str, class_names: list[str]) -> int:
    if name in class_names:
        return class_names.index(name)
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    raise MeddiffError(f"unknown normal class {name!r}; classes are {class_names} (names or 0-based ids)")


def pixel_error(images: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Mean squared error (N,) between uint8 images and their [0, 1] reconstructions (N, C, H, W)."""
    return ((images.astype(np.float32) / 255 - recon) ** 2).reshape(len(images), -1).mean(1)


def scores_of(images: np.ndarray, recon: np.ndarray, extractor: Any) -> dict[str, np.ndarray]:
    """uint8 images and [0, 1] reconstructions (N, C, H, W) → score arrays (N,) and the heatmaps (N, H, W)."""
    import torch

    f_x = extractor(torch.from_numpy(images))
    f_r = extractor((torch.from_numpy(recon) * 255).round().to(torch.uint8))
    return {"pixel": pixel_error(images, recon), "feature": (f_x - f_r).norm(dim=1).numpy(),
            "heatmap": np.abs(images.astype(np.float32) / 255 - recon).mean(1)}  # (N, H, W)


def heatmap_png(images: np.ndarray, recon: np.ndarray, heat: np.ndarray, titles: list[str]) -> bytes:
    """Rows: image | reconstruction | |x − x̂| (shared colour scale) for each of the given images."""
    n = len(images)
    fig = new_figure(figsize=(5, 1.7 * max(n, 1)))  # no pyplot (meddiff.figures)
    axes = fig.subplots(max(n, 1), 3, squeeze=False)
    vmax = float(heat.max()) if n else 1.0
    for i in range(n):
        img, rec = images[i].transpose(1, 2, 0) / 255, recon[i].transpose(1, 2, 0)  # (C,H,W) → (H,W,C)
        gray = img.shape[2] == 1
        axes[i, 0].imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[i, 1].imshow(rec[..., 0] if gray else rec, cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[i, 2].imshow(heat[i], cmap="inferno", vmin=0, vmax=vmax)
        axes[i, 0].set_ylabel(titles[i], fontsize=6)
    for ax, t in zip(axes[0], ("image", "reconstruction", "|x − x̂|")):
        ax.set_title(t, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    return to_png(fig, dpi=110)


def distributions_png(table, class_names: list[str], normal: str) -> bytes:
    """One panel per score: its histogram per class (normal class first)."""
    scores = [sc for sc in SCORES if f"{sc}_score" in table]
    fig = new_figure(figsize=(5 * len(scores), 3.2))  # no pyplot (meddiff.figures)
    axes = fig.subplots(1, len(scores), squeeze=False)[0]
    order = [normal] + [c for c in class_names if c != normal]
    for ax, score in zip(axes, scores):
        v = table[f"{score}_score"].to_numpy()
        bins = _bins(v)
        for c in order:
            sel = table["class_name"] == c
            if sel.any():
                ax.hist(v[sel.to_numpy()], bins=bins, alpha=0.5, density=True, label=f"{c} (n={int(sel.sum())})")
        ax.set_title(f"{score} score"), ax.set_xlabel("score (higher = more anomalous)")
    axes[0].set_ylabel("density (each class's area is 1)")
    axes[0].legend(fontsize=7)
    return to_png(fig, dpi=110)


def _bins(v: np.ndarray, n: int = 30) -> np.ndarray:
    """n histogram bins over v's finite values, in float64; a (near-)constant score (a ratio of 1 ± 1e-7
    when a barely trained model ignores its label) gets bins around its value."""
    v = v[np.isfinite(v)].astype(np.float64)  # float32 scores: bins finer than float32 spacing are refused
    if not len(v):
        return np.linspace(0.0, 1.0, n + 1)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo > 1e-9 * max(abs(lo), abs(hi), 1e-12):
        return np.histogram_bin_edges(v, n)
    pad = 0.05 * max(abs(hi), 1e-12)
    return np.linspace(lo - pad, hi + pad, n + 1)


def auroc_table(table, class_names: list[str], normal: str) -> dict[str, Any]:
    """AUROC (+ 95 % CI) of each score: all anomalies vs normal, and each anomaly class vs normal."""
    from meddiff.analysis.reconstruct import auroc, auroc_ci

    out: dict[str, Any] = {}
    is_normal = (table["class_name"] == normal).to_numpy()
    for score in [sc for sc in SCORES if f"{sc}_score" in table]:
        v = table[f"{score}_score"].to_numpy()
        rows = {"all anomalies": ~is_normal}
        rows.update({c: (table["class_name"] == c).to_numpy() for c in class_names if c != normal})
        out[score] = {}
        for scope, pos in rows.items():
            sel = pos | is_normal
            if pos.sum() == 0:
                continue
            out[score][scope] = {"auroc": auroc(v[sel], pos[sel]), "ci": auroc_ci(v[sel], pos[sel]),
                                 "n_anomalous": int(pos.sum()), "n_normal": int(is_normal.sum())}
    return out


def detect_anomalies(model_uri: str, dataset_uri: str | None, cfg: AnomalyConfig, root: str | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Score a real split (of ``dataset_uri``; None: the dataset the model learned from) with a model of the
    normal class; returns the ``anomaly.json`` record
    (``uri`` = its folder). Reuses a finished folder of the same request (``progress`` is told so);
    ``progress(reconstructions done, reconstructions)``: one per image, two with the ratio score."""
    from meddiff.analysis.reconstruct import reconstruct
    from meddiff.data.shards import open_dataset
    from meddiff.evaluate.features import DomainTrainConfig, load_or_train_domain
    from meddiff.generate.sampling import label_dropout
    from meddiff.locks import artifact_lock, tell_waiting
    from meddiff.models.trained import dataset_of, load_model

    cfg = cfg.check()
    model = load_model(model_uri, cfg.device)
    dataset_uri = dataset_uri or dataset_of(model)
    ds = open_dataset(dataset_uri)
    if (ds.image_size, ds.channels, ds.class_names) != (model.image_size, model.channels, model.class_names):
        raise MeddiffError(f"{dataset_uri} does not match the model's images/classes ({model.class_names}, "
                           f"{model.channels}×{model.image_size} px)")
    if cfg.guidance != 1.0 and (model.mode != "conditional" or not label_dropout(model)):  # was ignored, yet recorded
        why = ("it is per-class" if model.mode != "conditional"
               else "it was trained with label dropout 0 (no null label)")
        raise MeddiffError(f"--guidance {cfg.guidance} guides a conditional model toward the normal label through "
                           f"its null label; {model.uri}: {why}: leave --guidance at 1")
    normal_id = class_id(cfg.normal, ds.class_names)
    normal = ds.class_names[normal_id]
    key = content_hash({"model": model.checkpoint_sha256, "dataset": ds.version,
                        "config": {**vars(replace(cfg, normal=normal)), "device": None}})
    out_uri = storage.join(storage.storage_root(root), "anomaly", f"{ds.card.get('name', 'dataset')}-{key}")

    def reused() -> dict[str, Any] | None:
        if not storage.exists(storage.join(out_uri, "anomaly.json")):
            return None
        tell(progress, f"reusing {out_uri}: the same request was scored before")
        return storage.read_json(storage.join(out_uri, "anomaly.json"))

    if (found := reused()) is not None:
        return found
    with artifact_lock(out_uri, tell_waiting(progress, out_uri)):  # a second process asking the same waits
        return reused() or _publish(out_uri, *_score_split(ds, model, normal_id, cfg, reconstruct,
                                                           load_or_train_domain, DomainTrainConfig(), progress),
                                    ds, model, normal, cfg)


def _score_split(ds, model, normal_id, cfg, reconstruct, load_domain, domain_cfg, progress=None):
    import pandas as pd

    from meddiff.data.shards import iter_shard
    from meddiff.data.images import decode_png
    from meddiff.generate.sampling import label_dropout

    configure_threads()  # CPU threads that fit the machine now, as evaluate's (meddiff.threads)

    samples = [(s["__key__"], decode_png(s["png"]), int(s["cls"])) for u in ds.shard_uris(cfg.split)
               for s in iter_shard(u)]
    if not samples:
        raise MeddiffError(f"{ds.uri} has no {cfg.split} images; pick another --split")
    if cfg.max_images is not None and len(samples) > cfg.max_images:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(samples), cfg.max_images, replace=False))
        samples = [samples[i] for i in keep]
    keys, images, labels = [s[0] for s in samples], np.stack([s[1] for s in samples]), np.array([s[2] for s in samples])
    if not (labels == normal_id).any() or (labels == normal_id).all():
        raise MeddiffError(f"the {cfg.split} split needs normal and anomalous images to compute an AUROC")
    ratio = model.mode == "conditional" and model.null_class is not None and label_dropout(model) != 0
    passes = 2 if ratio else 1  # the ratio score reconstructs every image a second time

    def done(offset: int):  # reconstruct's count of one pass → progress over all passes
        return None if progress is None else lambda n: progress(offset + n, passes * len(images))

    recon = reconstruct(model, images, normal_id, cfg.level, cfg.steps, cfg.guidance, cfg.seed, cfg.batch_size,
                        done(0))
    device = str(next(next(iter(model.networks.values())).parameters()).device)
    extractor = load_domain(ds, domain_cfg, device, progress=told_only(progress))  # its steps are not reconstructions
    sc = scores_of(images, recon, extractor)
    table = pd.DataFrame({"key": keys, "label": labels, "class_name": [ds.class_names[c] for c in labels],
                          "anomalous": labels != normal_id, "pixel_score": sc["pixel"],
                          "feature_score": sc["feature"]})
    if ratio:
        # the same noise, the null label (trained by label dropout): reconstruction under p(x) vs p(x | normal)
        recon_null = reconstruct(model, images, model.null_class, cfg.level, cfg.steps, 1.0, cfg.seed, cfg.batch_size,
                                 done(len(images)))
        table["ratio_score"] = sc["pixel"] / np.maximum(pixel_error(images, recon_null), 1e-12)
    return table, images, recon, sc["heatmap"]


def _publish(out_uri, table, images, recon, heat, ds, model, normal, cfg) -> dict[str, Any]:
    top = np.argsort(-table["pixel_score"].to_numpy())[: cfg.heatmaps]
    titles = [f"{table['class_name'][i][:18]}\n{table['pixel_score'][i]:.4f}" for i in top]
    storage.write_bytes(storage.join(out_uri, "scores.parquet"), table.to_parquet(index=False))
    storage.write_bytes(storage.join(out_uri, "heatmaps.png"), heatmap_png(images[top], recon[top], heat[top], titles))
    storage.write_bytes(storage.join(out_uri, "distributions.png"), distributions_png(table, ds.class_names, normal))
    record = make_record("anomaly", replace(cfg, normal=normal),
                         {"model": model.uri, "checkpoint_sha256": model.checkpoint_sha256, "dataset": ds.uri,
                          "dataset_version": ds.version},
                         uri=out_uri, objective=model.objective, mode=model.mode,
                         counts=table["class_name"].value_counts().to_dict(),
                         auroc=auroc_table(table, ds.class_names, normal),
                         notes="feature score: domain classifier trained with the training split's labels "
                               "(anomaly classes included), so it is not label-free; pixel score is; ratio score "
                               "(conditional models): normal-label vs null-label reconstruction error (the model "
                               "saw every training label, the score asks only for the normal and the null one)")
    storage.write_json(storage.join(out_uri, "anomaly.json"), record)
    return record
