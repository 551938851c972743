"""Noise schedules (MONAI schedulers) and the training losses, in the papers' notation.

Images live in [-1, 1]. Two objectives:

* ``ddpm`` — Ho et al. 2020: x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε with integer t ∈ [0, T); the network
  predicts ε (``epsilon``, eq. 14) or v = sqrt(ᾱ_t) ε − sqrt(1-ᾱ_t) x_0 (``v_prediction``,
  Salimans & Ho 2022, §4). Optional min-SNR-γ weighting (Hang et al. 2023, eq. 9/Table 1).
* ``rflow`` — rectified flow (Liu et al. 2022) in MONAI's convention: with s = t/T,
  x_t = (1-s) x_0 + s ε and the network predicts the velocity x_0 − ε, so that
  ``RFlowScheduler.step`` (x ← x + v·Δs) walks from noise (t = T) to data (t = 0).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

Objective = Literal["ddpm", "rflow"]
Schedule = Literal["linear", "cosine", "sigmoid"]
Prediction = Literal["epsilon", "v"]

MONAI_SCHEDULE = {"linear": "linear_beta", "cosine": "cosine", "sigmoid": "sigmoid_beta"}
MONAI_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}


def scheduler_config(objective: Objective, schedule: Schedule, prediction: Prediction,
                     num_train_timesteps: int, image_size: int) -> dict[str, Any]:
    """Keyword arguments that rebuild the training noise schedule (``build_scheduler``)."""
    if objective == "ddpm":
        return {"objective": "ddpm", "num_train_timesteps": num_train_timesteps,
                "schedule": MONAI_SCHEDULE[schedule], "prediction_type": MONAI_PREDICTION[prediction]}
    return {"objective": "rflow", "num_train_timesteps": num_train_timesteps, "use_discrete_timesteps": False,
            "sample_method": "uniform", "spatial_dim": 2, "base_img_size_numel": image_size * image_size}


def build_scheduler(config: dict[str, Any]) -> DDPMScheduler | RFlowScheduler:
    """The MONAI scheduler described by ``scheduler_config(...)``."""
    kw = {k: v for k, v in config.items() if k != "objective"}
    return DDPMScheduler(**kw) if config["objective"] == "ddpm" else RFlowScheduler(**kw)


def sample_timesteps(scheduler: DDPMScheduler | RFlowScheduler, x0: torch.Tensor) -> torch.Tensor:
    """Training timesteps, one per image: (B,), uniform over [0, T)."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.sample_timesteps(x0)
    return torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)


def ddpm_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                prediction: Prediction) -> torch.Tensor:
    """Regression target of DDPM: ε (Ho et al. 2020, eq. 14) or v (Salimans & Ho 2022).

    x0, eps: (B, C, H, W); t: (B,) integer; alphas_cumprod: (T,) ᾱ. Returns (B, C, H, W).
    """
    if prediction == "epsilon":
        return eps
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)  # (B,) → (B, 1, 1, 1)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def rflow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Rectified-flow velocity x_0 − ε (Liu et al. 2022, eq. 1, MONAI's time direction). (B, C, H, W)."""
    return x0 - eps


def min_snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   prediction: Prediction) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v.

    t: (B,) integer; alphas_cumprod: (T,). Returns (B,).
    """
    a = alphas_cumprod.to(t.device)[t]
    snr = a / (1 - a)  # SNR(t) = ᾱ_t / (1 - ᾱ_t)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """E_b[ w_b · ‖pred_b − target_b‖² / (C·H·W) ]; pred, target: (B, C, H, W); weight: (B,) or None."""
    per_image = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B, C·H·W) → (B,)
    return per_image.mean() if weight is None else (weight * per_image).mean()


def diffusion_loss(net, x0: torch.Tensor, labels: torch.Tensor | None, scheduler, prediction: Prediction,
                   min_snr_gamma: float | None = None) -> torch.Tensor:
    """One Monte-Carlo estimate of the training loss for a batch x0: (B, C, H, W) in [-1, 1]."""
    eps = torch.randn_like(x0)
    t = sample_timesteps(scheduler, x0)  # (B,)
    x_t = scheduler.add_noise(original_samples=x0, noise=eps, timesteps=t)  # (B, C, H, W)
    pred = net(x_t, timesteps=t, class_labels=labels)
    if isinstance(scheduler, RFlowScheduler):
        return weighted_mse(pred, rflow_target(x0, eps))
    target = ddpm_target(x0, eps, t, scheduler.alphas_cumprod, prediction)
    weight = None if min_snr_gamma is None else min_snr_weight(t, scheduler.alphas_cumprod, min_snr_gamma, prediction)
    return weighted_mse(pred, target, weight)
