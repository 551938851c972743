"""Reverse-diffusion samplers over MONAI's schedulers, one short pure function each.

Images are (B, C, H, W) in [-1, 1]. A ``Denoiser`` maps (x_t, t) → the network output in the
training convention (ε, v or rectified-flow velocity; see ``meddiff.checkpoint.TrainedModel``).

Per-sample randomness: sample i owns ``generators[i]``; its starting noise x_T and every noise
draw of a stochastic step come from it alone, so an image does not depend on which batch it was
generated in, up to the network's float rounding: CPU and GPU kernels choose their blocking by
batch size, which can move the last bits (±1 grey level on rare pixels after quantisation).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from monai.networks.schedulers import DDIMScheduler, RFlowScheduler

Sampler = Literal["ddpm", "ddim", "rflow"]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) → (B,C,H,W)
Trace = list[torch.Tensor]  # x_t snapshots, each (B, C, H, W)


def initial_noise(seeds: list[int], shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """x_T ~ N(0, I): (B, C, H, W), drawn on the CPU from each sample's own seed (device-independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def step_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sample for the noise of stochastic steps (offset from the x_T stream)."""
    return [torch.Generator(device=device).manual_seed(s + 1) for s in seeds]


def classifier_free_guidance(net: torch.nn.Module, y: torch.Tensor, null_class: int, scale: float) -> Denoiser:
    """ε̃(x_t, y) = ε(x_t, ∅) + s·(ε(x_t, y) − ε(x_t, ∅))  (Ho & Salimans 2022, eq. 6 with s = 1 + w).

    Conditional and null labels go through the network in one batched forward; s = 1 is plain
    conditional sampling (one forward).
    """
    if scale == 1.0:
        return lambda x, t: net(x, timesteps=t, class_labels=y)
    null = torch.full_like(y, null_class)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = net(torch.cat([x, x]), timesteps=torch.cat([t, t]), class_labels=torch.cat([y, null]))  # (2B,C,H,W)
        cond, uncond = out.chunk(2)  # each (B, C, H, W)
        return uncond + scale * (cond - uncond)

    return denoise


def sample_ddim(denoise: Denoiser, x_T: torch.Tensor, scheduler: DDIMScheduler, steps: int, eta: float,
                generators: list[torch.Generator], trace: Trace | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on ``steps`` respaced timesteps; returns x_0 (B, C, H, W).

    η = 0 is the deterministic DDIM sampler; η = 1 is DDPM's ancestral sampler (Ho et al. 2020,
    Alg. 2) on the respaced chain (Song et al. eq. 16), its noise drawn per sample.
    """
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T
    for t in scheduler.timesteps:
        out = denoise(x, t.expand(x.shape[0]))
        if eta == 0:
            x, _ = scheduler.step(out, int(t), x, eta=0.0)
        else:
            x = torch.cat([scheduler.step(out[i:i + 1], int(t), x[i:i + 1], eta=eta, generator=g)[0]
                           for i, g in enumerate(generators)])  # B × (1, C, H, W) → (B, C, H, W)
        if trace is not None:
            trace.append(x.detach().float().cpu())
    return x


def sample_rflow(denoise: Denoiser, x_T: torch.Tensor, scheduler: RFlowScheduler, steps: int,
                 trace: Trace | None = None) -> torch.Tensor:
    """Euler integration of the rectified-flow ODE dx/dt = v(x_t, t) (Liu et al. 2022, eq. 1)
    from t = T (noise) to t = 0 (data) on ``steps`` steps; returns x_0 (B, C, H, W)."""
    numel = x_T.shape[-1] * x_T.shape[-2]
    scheduler.set_timesteps(steps, device=x_T.device, input_img_size_numel=numel)
    ts = scheduler.timesteps
    next_ts = torch.cat([ts[1:], torch.zeros_like(ts[:1])])
    x = x_T
    for t, t_next in zip(ts, next_ts):
        v = denoise(x, t.expand(x.shape[0]))
        x, _ = scheduler.step(v, t, x, t_next)
        if trace is not None:
            trace.append(x.detach().float().cpu())
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (B, C, H, W) → uint8 (B, C, H, W)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
