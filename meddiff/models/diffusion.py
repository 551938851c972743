"""Noise schedules (MONAI schedulers) and the training losses, in the papers' notation.

Images live in [-1, 1]. Two objectives:

* ``ddpm`` — Ho et al. 2020: x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε with integer t ∈ [0, T); the network
  predicts ε (``epsilon``, eq. 14) or v = sqrt(ᾱ_t) ε − sqrt(1-ᾱ_t) x_0 (``v_prediction``,
  Salimans & Ho 2022, §4). Optional min-SNR-γ weighting (Hang et al. 2023, eq. 9/Table 1).
* ``rflow`` — rectified flow (Liu et al. 2022) in MONAI's convention: with s = t/T,
  x_t = (1-s) x_0 + s ε and the network predicts the velocity x_0 − ε, so that
  a reverse step x ← x + v·Δs walks from noise (t = T) to data (t = 0).

Sampling reads the chain from here: ``sampling_grid`` (the scheduled (t, a, b) points, ending at the
clean end) and ``to_x0_eps`` (the network output of each objective → x̂₀, ε̂ in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
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


def sample_timesteps(scheduler: DDPMScheduler | RFlowScheduler, x0: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Training timesteps, one per image: (B,), uniform over [0, T): integers for DDPM, reals for rectified
    flow (MONAI's ``RFlowScheduler.sample_timesteps`` for ``scheduler_config``'s settings, which draws from
    torch's global stream only). ``generator``: the stream to draw from (None: torch's global one; a
    rectified-flow scheduler with other settings than ``scheduler_config``'s draws MONAI's way, from it)."""
    B, T = x0.shape[0], scheduler.num_train_timesteps
    if isinstance(scheduler, RFlowScheduler):
        if generator is None or scheduler.sample_method != "uniform" or scheduler.use_discrete_timesteps \
                or scheduler.use_timestep_transform:
            return scheduler.sample_timesteps(x0)
        return torch.rand((B,), generator=generator, device=x0.device) * T
    return torch.randint(0, T, (B,), generator=generator, device=x0.device)


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
                   min_snr_gamma: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Monte-Carlo estimate of the training loss for a batch x0: (B, C, H, W) in [-1, 1]; ε and t
    drawn from ``generator`` (None: torch's global stream)."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, C, H, W)
    t = sample_timesteps(scheduler, x0, generator)  # (B,)
    x_t = scheduler.add_noise(original_samples=x0, noise=eps, timesteps=t)  # (B, C, H, W)
    pred = net(x_t, timesteps=t, class_labels=labels)
    if isinstance(scheduler, RFlowScheduler):
        return weighted_mse(pred, rflow_target(x0, eps))
    target = ddpm_target(x0, eps, t, scheduler.alphas_cumprod, prediction)
    weight = None if min_snr_gamma is None else min_snr_weight(t, scheduler.alphas_cumprod, min_snr_gamma, prediction)
    return weighted_mse(pred, target, weight)


# --- sampling: the reverse chain's grid and the network output → (x̂₀, ε̂) adapters ----------------------
#
# Every objective writes x_t = a_t·x₀ + b_t·ε: DDPM a = √ᾱ_t, b = √(1−ᾱ_t); rectified flow a = 1 − s,
# b = s with s = t/T. The samplers only see (a, b) on a grid and an x̂₀/ε̂ predictor, so one update
# rule serves every objective and runs unchanged on latents.

Parameterization = Literal["epsilon", "v_prediction", "velocity"]  # what the network outputs


@dataclass(frozen=True)
class Grid:
    """The N + 1 points of a reverse chain, noise → clean; step i goes from point i to point i + 1.

    t: (N+1,) float32 network timesteps (t[N] is the clean end, never fed to the network);
    a, b: (N+1,) float32 signal and noise scales of x_t = a·x₀ + b·ε, with a[N] = 1, b[N] = 0.
    """

    t: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.t) - 1


def ddpm_grid(alphas_cumprod: torch.Tensor, steps: int) -> Grid:
    """Respaced DDPM chain (DiT respace.py idea): N scheduled timesteps, then the clean end ᾱ = 1.

    In Ho et al.'s indexing τ_i = round(T·(1 − i/N)), i = 0..N, from τ_0 = T to τ_N = 0 (ᾱ_0 := 1);
    MONAI's index of τ is τ − 1. Each step goes exactly to the next *scheduled* timestep, so any N
    in [1, T] is exact and N = T is the full DDPM chain. alphas_cumprod: (T,) ᾱ of the training schedule.
    """
    T = len(alphas_cumprod)
    tau = torch.round(torch.linspace(T, 0, steps + 1, dtype=torch.float64)).long()  # (N+1,) from T to 0
    abar = torch.cat([alphas_cumprod.double(), torch.ones(1, dtype=torch.float64)])[tau - 1]  # index −1 → ᾱ = 1
    return Grid((tau - 1).clamp(min=0).float(), abar.sqrt().float(), (1 - abar).sqrt().float())


def rflow_grid(num_train_timesteps: int, steps: int) -> Grid:
    """Uniform rectified-flow chain s_i = 1 − i/N in float32 (s_0 = 1 and s_N = 0 exactly, so Σ Δs = 1)."""
    s = torch.linspace(1, 0, steps + 1, dtype=torch.float64).float()  # (N+1,)
    return Grid(s * num_train_timesteps, 1 - s, s)


def parameterization(config: dict[str, Any]) -> Parameterization:
    """What the network of a ``scheduler_config`` outputs: ε, v or the rectified-flow velocity x₀ − ε."""
    return "velocity" if config["objective"] == "rflow" else config["prediction_type"]


def sampling_grid(config: dict[str, Any], steps: int) -> Grid:
    """The reverse chain of ``steps`` steps for a model's ``scheduler_config``; ᾱ read from MONAI's
    training scheduler (so the values match training)."""
    if config["objective"] == "rflow":
        return rflow_grid(int(config["num_train_timesteps"]), steps)
    return ddpm_grid(build_scheduler(config).alphas_cumprod, steps)


def to_x0_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              kind: Parameterization) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output → (x̂₀, ε̂), both (B, C, H, W) float32, for x = a·x₀ + b·ε (a, b scalars).

    ε: x̂₀ = (x − b ε̂)/a (Ho et al. eq. 15); v = a ε − b x₀: x̂₀ = a x − b v, ε̂ = b x + a v
    (Salimans & Ho 2022, §4, a² + b² = 1); velocity u = x₀ − ε: x̂₀ = x + b u, ε̂ = x − a u.
    """
    out, x = out.float(), x.float()
    if kind == "epsilon":
        return (x - b * out) / a, out
    if kind == "v_prediction":
        return a * x - b * out, b * x + a * out
    return x + b * out, x - a * out
