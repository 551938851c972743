"""Partial noising and denoising toward the normal class (AnoDDPM, Wyatt et al. 2022): the
reconstruction an anomaly score compares an image with.

An image x_0 (B, C, H, W) in [-1, 1] is noised to level λ ∈ (0, 1] — DDPM: t* = λ (T − 1),
x_t* = √ᾱ_t* x_0 + √(1−ᾱ_t*) ε (Ho et al. 2020, eq. 4); rectified flow: s = λ,
x_s = (1 − s) x_0 + s ε — and integrated back to t = 0 deterministically (DDIM, η = 0, Song et al.
2021 eq. 12; rectified-flow Euler, Liu et al. 2022 eq. 1) by a model of normal images only. What the
model cannot explain as normal is changed; the difference is the anomaly evidence. A latent model
does the same on z_0 = E(x_0) (its autoencoder's scaled latents, unclipped) and decodes x̂ = D(ẑ_0).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from meddiff.models.likelihood import to_x0
from meddiff.models.samplers import classifier_free_guidance

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) → network output


def ddim_from(denoise: Denoiser, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, t_start: int, steps: int,
              prediction: str, clip: bool = True) -> torch.Tensor:
    """Noise x0 to t_start, then deterministic DDIM (η = 0) on ``steps`` steps to x̂_0. (B, C, H, W).
    ``clip``: clamp x̂_0 to the data range [-1, 1] (pixels; latents are not bounded)."""
    ts = np.unique(np.linspace(0, t_start, steps + 1).round().astype(int))[::-1]  # t_start … 0, descending
    a = abar[t_start]
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps  # q(x_t* | x_0), Ho et al. eq. 4
    x0_hat = x0
    for k, t in enumerate(ts):
        a_t = abar[t]
        out = denoise(x, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long))
        x0_hat = to_x0(out.float(), x, a_t.view(1, 1, 1, 1), prediction)
        x0_hat = x0_hat.clamp(-1, 1) if clip else x0_hat
        if k + 1 < len(ts):
            a_next = abar[ts[k + 1]]
            eps_hat = (x - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
            x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps_hat  # Song et al. eq. 12, σ = 0
    return x0_hat


def rflow_from(denoise: Denoiser, x0: torch.Tensor, eps: torch.Tensor, T: int, level: float, steps: int,
               clip: bool = True) -> torch.Tensor:
    """x_s = (1−s) x_0 + s ε at s = level, then Euler on dx/ds = −v (v = x_0 − ε) to s = 0. (B, C, H, W)."""
    s_grid = torch.linspace(level, 0, steps + 1, device=x0.device)
    x = (1 - level) * x0 + level * eps
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        v = denoise(x, (s * T).expand(x.shape[0]))
        x = x + (s - s_next) * v.float()
    return x.clamp(-1, 1) if clip else x


def normal_denoiser(model: Any, normal_id: int, batch: int, guidance: float, device: torch.device) -> Denoiser:
    """The model of the normal class: its own network (per-class), or the conditional network with
    classifier-free guidance toward the normal label."""
    if model.mode == "per-class":
        net = model.networks[normal_id]
        return lambda x, t: net(x, timesteps=t)
    y = torch.full((batch,), normal_id, device=device, dtype=torch.long)
    return classifier_free_guidance(model.networks[None], y, model.null_class, guidance)  # batch rows of x


def reconstruct(model: Any, images: np.ndarray, normal_id: int, level: float, steps: int, guidance: float,
                seed: int, batch_size: int = 64, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Reconstructions (float32 (N, C, H, W) in [0, 1]) of uint8 images (N, C, H, W) by the normal model
    (a latent model: in its autoencoder's latent space, decoded).

    Image i's noise comes from its own generator (seed + i): independent of the batching.
    ``progress(images done)`` after each batch.
    """
    from meddiff.models.diffusion import build_scheduler

    device = next(next(iter(model.networks.values())).parameters()).device
    sched_cfg = model.scheduler_config
    T = int(sched_cfg["num_train_timesteps"])
    abar = build_scheduler(sched_cfg).alphas_cumprod.to(device) if model.objective == "ddpm" else None
    ae = model.autoencoder  # latent diffusion: noise and denoise E(x), decode the result
    out = np.zeros(images.shape, np.float32)
    for start in range(0, len(images), batch_size):
        x0 = torch.from_numpy(images[start:start + batch_size]).to(device).float() / 127.5 - 1  # → [-1, 1]
        if ae is not None:
            x0 = ae.to_latent(x0)  # (B, C_lat, h, w) scaled latents
        eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed + start + i))
                           for i in range(len(x0))]).to(device)
        den = normal_denoiser(model, normal_id, len(x0), guidance, device)
        with torch.no_grad():
            if abar is not None:
                rec = ddim_from(den, x0, eps, abar, int(round(level * (T - 1))), steps, sched_cfg["prediction_type"],
                                clip=ae is None)
            else:
                rec = rflow_from(den, x0, eps, T, level, steps, clip=ae is None)
            if ae is not None:
                rec = ae.from_latent(rec)  # (B, C, H, W) in [-1, 1]
        out[start:start + len(rec)] = ((rec + 1) / 2).cpu().numpy()
        if progress is not None:
            progress(start + len(rec))
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of an anomaly > score of a normal image), ties ½
    (Mann-Whitney U / (n₊ n₋), Hanley & McNeil 1982). scores, positive: (N,)."""
    from scipy.stats import rankdata

    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_ci(scores: np.ndarray, positive: np.ndarray, n_boot: int = 500, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap CI of the AUROC, resampling anomalies and normals separately."""
    pos_idx, neg_idx = np.flatnonzero(positive), np.flatnonzero(~positive.astype(bool))
    if len(pos_idx) < 2 or len(neg_idx) < 2:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos_idx, len(pos_idx)), rng.choice(neg_idx, len(neg_idx))])
        vals.append(auroc(scores[idx], positive[idx]))
    return [float(v) for v in np.quantile(vals, [0.025, 0.975])]
