"""How well an autoencoder reconstructs the val split, and ``meddiff encode`` (latent shards + that report).

Metrics on the first ``max_images`` val images x and their reconstructions x̂ = D(E(x)) (through
the stored latent format: float16 latents or VQ codes), each with a 95 % bootstrap CI:
PSNR (dB, [0, 1] range), SSIM, MS-SSIM (≥ 161 px only), and reconstruction FID / KID in the
domain classifier's feature space at matched n (x̂ vs x), beside the like-with-like baseline of the
same n of train images vs those val images. LPIPS (unit layer weights) only with local backbone
weights (``perceptual_weights``). A UMAP of the
latents coloured by class; the compression ratio from the autoencoder card.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from meddiff import storage
from meddiff.data.shards import open_dataset
from meddiff.devices import resolve_device
from meddiff.evaluate.bootstrap import mean_ci, small_n_warning, subsample_interval
from meddiff.evaluate.features import DomainTrainConfig, load_or_train_domain
from meddiff.evaluate.fidelity import fid, kid_unbiased
from meddiff.evaluate.similarity import ms_ssim_pairs, ssim_pairs
from meddiff.errors import MeddiffError
from meddiff.figures import new_figure, to_png
from meddiff.models.autoencoders import TrainedAutoencoder, load_autoencoder
from meddiff.progress import Progress, tell
from meddiff.threads import configure_threads

RELIABLE_N = 250  # below this, set-level metrics carry a warning


@torch.no_grad()
def reconstruct(ae: TrainedAutoencoder, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 N×C×H×W → (uint8 reconstructions N×C×H×W, scaled latents N×C_lat×h×w), through the stored
    format (VAE latents rounded to float16, VQ latents as codes)."""
    dev = next(ae.net.parameters()).device
    outs, lats = [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).float().div(127.5).sub(1).to(dev)  # (B, C, H, W) in [-1, 1]
        z = ae.net.encode(x)
        if ae.card["ae_kind"] == "vae":
            z = z.half().float()  # what a float16 latent shard holds
        x_hat = ae.net.decode(z, ae.image_size).clamp(-1, 1)
        outs.append(((x_hat + 1) * 127.5).round().byte().cpu())
        lats.append((z * ae.scale_factor).cpu())
    return torch.cat(outs).numpy(), torch.cat(lats)


def _stat(values: torch.Tensor | None) -> dict[str, Any] | None:
    if values is None:
        return None
    v = values.double()
    return {"mean": float(v.mean()), "ci95": mean_ci(v), "n": len(v)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of a, b float N×C×H×W in [0, 1]: 10 log10(1 / MSE) (capped at 100 dB)."""
    mse = (a - b).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def pixel_metrics(x: np.ndarray, x_hat: np.ndarray) -> dict[str, Any]:
    a, b = torch.from_numpy(x).float() / 255, torch.from_numpy(x_hat).float() / 255
    return {"psnr_db": _stat(psnr(a, b)), "ssim": _stat(ssim_pairs(a, b)), "ms_ssim": _stat(ms_ssim_pairs(a, b))}


def _fid_kid(real: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """FID and unbiased KID (Bińkowski 2018, eq. 2) of two feature sets N×D, M×D."""
    return {"fid": fid(real, other), "kid": kid_unbiased(real, other)}


def _with_intervals(real: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """FID and KID of the whole sets, each with its half-sampling 95 % interval (bootstrap.py; FID ≥ 0)."""
    est = _fid_kid(real, other)
    ci = subsample_interval(_fid_kid, [real, other], est, bounds={"fid": (0.0, np.inf)})
    return {"fid": est["fid"], "fid_ci95": list(ci["fid"]) if "fid" in ci else None,
            "kid": est["kid"], "kid_ci95": list(ci["kid"]) if "kid" in ci else None}


def feature_metrics(ds, x: np.ndarray, x_hat: np.ndarray, device: str, domain_steps: int | None) -> dict[str, Any]:
    """Reconstruction FID/KID in domain features (x̂ vs x) beside train-vs-val at the same n, each with its
    interval. (KID was the mean ± std over subsets of all n images: every subset the same set, std ~1e-7.)"""
    cfg = DomainTrainConfig() if domain_steps is None else DomainTrainConfig(steps=domain_steps)
    ext = load_or_train_domain(ds, cfg, device)
    xtr, _ = ds.load_split("train")
    n = min(len(x), len(xtr))
    f_real, f_rec, f_train = ext(x[:n]), ext(x_hat[:n]), ext(xtr[:n])
    out: dict[str, Any] = {"extractor": "domain", "n": n, "warning": small_n_warning(n, RELIABLE_N, "FID/KID")}
    if n < 10:
        return {**out, "skipped": "fewer than 10 images"}
    return {**out, **_with_intervals(f_real, f_rec), "fid_note": "n-dependent: compare at equal n only",
            "kid_note": "unbiased MMD² on the whole sets (Bińkowski 2018, eq. 2)",
            "baseline": {"what": "val vs the same number of train images", **_with_intervals(f_real, f_train)}}


def summary_lines(rec: dict[str, Any]) -> list[str]:
    """The reconstruction report (``latents.json → reconstruction``) in a few lines, for the command's user."""
    def mean(name: str, fmt: str, unit: str = "") -> str | None:
        m = rec.get(name)
        return m and f"{name.replace('_db', '').upper().replace('MS_', 'MS-')} {m['mean']:{fmt}}{unit} " \
                     f"[{m['ci95'][0]:{fmt}}, {m['ci95'][1]:{fmt}}]"

    from meddiff.evaluate.summary import with_ci

    def stat(d: dict[str, Any], k: str) -> str:
        return with_ci(d[k], d.get(f"{k}_ci95"))

    parts = [p for p in (mean("psnr_db", ".2f", " dB"), mean("ssim", ".3f"), mean("ms_ssim", ".3f"),
                         mean("lpips", ".3f")) if p]
    lines = [f"reconstruction of {rec['n']} val images: {', '.join(parts)}"]
    f = rec.get("features") or {}
    if "fid" in f:
        b = f["baseline"]
        lines.append(f"domain features, x̂ vs x: FID {stat(f, 'fid')}, KID {stat(f, 'kid')}; real val vs as many "
                     f"train images: FID {stat(b, 'fid')}, KID {stat(b, 'kid')} (n = {f['n']})")
    elif f.get("skipped"):
        lines.append(f"domain-feature FID/KID skipped: {f['skipped']}")
    if f.get("warning"):
        lines.append(f"warning: {f['warning']}")
    return lines


@torch.no_grad()
def perceptual_metrics(x: np.ndarray, x_hat: np.ndarray, weights: str | None, device: str,
                       batch: int = 64) -> dict[str, Any]:
    """LPIPS-style distance of each (x, x̂) pair (uint8 N×C×H×W) on a local backbone (``weights``: a
    torchvision AlexNet/VGG16 state dict), unit layer weights; without weights, the reason it is absent."""
    if not weights:
        return {"lpips": None, "lpips_note": "not computed: pass --perceptual-weights PATH (a local torchvision "
                                              "AlexNet/VGG16 state dict; nothing is downloaded)"}
    from meddiff.models.perceptual import PerceptualLoss
    from meddiff.records import sha256_file

    path = storage.fetch_local(weights)
    net = PerceptualLoss(path).to(device)
    f = lambda a: torch.from_numpy(a).float().div(127.5).sub(1).to(device)  # noqa: E731  uint8 → [-1, 1]
    d = torch.cat([net.distances(f(x[i:i + batch]), f(x_hat[i:i + batch])).cpu() for i in range(0, len(x), batch)])
    return {"lpips": _stat(d), "lpips_note": f"LPIPS distance (Zhang et al. 2018, eq. 1) with unit layer weights on "
            f"a local {net.arch} backbone (sha256 {sha256_file(path)[:12]}); "
            "not comparable with published LPIPS values, which use learned layer weights"}


def umap_png(latents: torch.Tensor, labels: np.ndarray, class_names: list[str], seed: int = 0) -> bytes | None:
    """UMAP (McInnes et al. 2018) of flattened latents N×D, coloured by class; None without umap-learn."""
    from meddiff.evaluate.umap_plot import load_umap

    try:
        umap = load_umap()
    except MeddiffError:  # umap-learn is not installed
        return None
    emb = umap.UMAP(n_neighbors=min(15, len(latents) - 1), random_state=seed, n_jobs=1).fit_transform(
        latents.flatten(1).numpy())  # (N, C_lat·h·w) → (N, 2)
    fig = new_figure(figsize=(5.5, 4.5), dpi=100)  # no pyplot (meddiff.figures)
    ax = fig.subplots()
    for c, name in enumerate(class_names):
        m = labels == c
        if m.any():
            ax.scatter(emb[m, 0], emb[m, 1], s=6, alpha=0.7, label=name)
    ax.set(title="UMAP of the latents (val)", xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    return to_png(fig)


def reconstruction_report(dataset_uri: str, ae_uri: str, device: str = "auto", max_images: int = 1000,
                          domain_steps: int | None = None, with_umap: bool = True,
                          perceptual_weights: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """(report dict, pictures {name: PNG bytes}) for the val split of ``dataset_uri``."""
    from meddiff.plots import image_grid

    dev = str(resolve_device(device))
    ds, ae = open_dataset(dataset_uri), load_autoencoder(ae_uri, dev)
    x, y = ds.load_split("val")
    x, y = x[:max_images or None], y[:max_images or None]  # 0 = all
    x_hat, z = reconstruct(ae, x)
    pictures = {"reconstructions.png": image_grid(np.concatenate([x[:16], x_hat[:16]]), cols=16)}
    if with_umap and len(z) > 2 and (png := umap_png(z, y, ds.class_names)) is not None:
        pictures["latent_umap.png"] = png
    report = {"split": "val", "n": len(x), **pixel_metrics(x, x_hat),
              "features": feature_metrics(ds, x, x_hat, dev, domain_steps),
              **perceptual_metrics(x, x_hat, perceptual_weights, dev),
              "compression_ratio": ae.card["compression_ratio"], "latent_shape": ae.card["latent_shape"],
              "scale_factor": ae.scale_factor, "umap": "latent_umap.png" if "latent_umap.png" in pictures else None}
    return report, pictures


def encode_with_report(dataset_uri: str, ae_uri: str, device: str = "auto", max_images: int = 1000,
                       root: str | None = None, domain_steps: int | None = None, with_umap: bool = True,
                       perceptual_weights: str | None = None, progress: Progress | None = None) -> dict:
    """``meddiff encode``: check the AE fits the dataset, write the reconstruction report and pictures,
    then the latent shards with ``latents.json`` last (it carries the report). Idempotent; a second
    process asking for the same latents waits for the first, then reuses them (the artifact lock).
    ``progress`` is told each step and counts the images encoded."""
    from pathlib import Path

    from meddiff.locks import artifact_lock, tell_waiting
    from meddiff.train.latent import autoencoder_ref
    from meddiff.train.latent_shards import RECORD, find_latents, latents_uri, write_latents

    if max_images < 0 or max_images == 1:
        raise MeddiffError(f"--max-images must be 0 (all) or at least 2 val images, not {max_images}")
    if perceptual_weights is not None and not storage.exists(perceptual_weights):
        raise MeddiffError(f"--perceptual-weights {perceptual_weights} does not exist (weights are never downloaded; "
                           "pass a local torchvision VGG16/AlexNet state dict)")
    ds = open_dataset(dataset_uri)
    ref = autoencoder_ref(ae_uri, ds)  # another dataset / size / channels → MeddiffError, nothing written
    uri = latents_uri(ds, Path(ref["uri"]).name)
    if find_latents(ds, ref) is None:
        with artifact_lock(uri, tell_waiting(progress, uri)):
            if find_latents(ds, ref) is None:  # (another process may have finished them while this one waited)
                # latents are tensors a model trains on: sized by the machine, not the moment's load, as
                # generation is (the thread count moves CPU kernels' last bits)
                configure_threads(load_aware=False)
                tell(progress, f"reconstruction report on {f'up to {max_images}' if max_images else 'all'} val images"
                               + (", with a UMAP of their latents" if with_umap else ""))
                report, pictures = reconstruction_report(dataset_uri, ae_uri, device, max_images, domain_steps,
                                                         with_umap, perceptual_weights)
                for name, png in pictures.items():
                    storage.write_bytes(storage.join(uri, name), png)
                tell(progress, "encoding every split into latent shards")
                ae = load_autoencoder(ae_uri, str(resolve_device(device)))
                uri, card = write_latents(ds, ae, {"reconstruction": report}, progress)
                return {"uri": uri, "card": card, "existed": False}
    card = storage.read_json(storage.join(uri, RECORD))
    made = card.get("reconstruction") or {}
    tell(progress, f"reusing {uri}: this dataset was encoded with this autoencoder before; its reconstruction "
                   f"report is the one made then ({made.get('n', '?')} val images, LPIPS "
                   f"{'yes' if made.get('lpips') else 'no'}): delete the folder to encode and report again")
    return {"uri": uri, "card": card, "existed": True}
