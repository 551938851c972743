"""Reverse-diffusion samplers: short pure update rules over a ``Grid`` of (t, a, b) points.

Images are (B, C, H, W) in [-1, 1]; x_t = a·x₀ + b·ε on every objective (``meddiff.models.diffusion``).
A ``Predict`` maps (x at grid point i, i) → (x̂₀, ε̂) in float32; ``predictor`` builds it from the
network and the objective's adapter, so each sampler is a loop over the grid that never sees the
objective and never calls MONAI's ``.step()``. The state x is float32 even when the network runs
under bf16 autocast.

Per-sample randomness (EDM's ``StackedRandomGenerator``): sample i owns one CPU generator, seeded
from its own seed; its x_T and then every noise draw of a stochastic step come from it alone, so an
image does not depend on the device's RNG nor on which batch it was generated in (up to the
network's float rounding: CPU/GPU kernels choose their blocking by batch size, which can move the
last bits).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from meddiff.models.diffusion import Grid, Parameterization, to_x0_eps

Sampler = Literal["ddim", "ddpm", "dpmpp2m", "rflow", "heun"]
DDPM_SAMPLERS = ("ddim", "ddpm", "dpmpp2m")  # for ε and v models
RFLOW_SAMPLERS = ("rflow", "heun")  # for rectified-flow models
# sampler="auto" per network output (README "Generate", bench_samplers): Heun for rectified flow (exact-denoiser
# table: 10× less error than Euler at equal cost); DPM-Solver++(2M) for v-prediction (DDPM-1000 quality at
# 20 NFE, DDIM needs 50); DDIM for ε — DPM-Solver++ followed the ε models' saturated probability-flow ODE
# where DDIM, which keeps ε̂ beside the clipped x̂₀, did not.
AUTO_SAMPLER: dict[Parameterization, Sampler] = {"epsilon": "ddim", "v_prediction": "dpmpp2m", "velocity": "heun"}
# steps when none are asked (README "Generate", bench_samplers' real-model table): DDIM reaches the 1000-step
# DDPM's quality at 50; ancestral (η = 1) needs ~100; Euler and heun converged by ~20 NFE on the tiny rflow
# model, 25 steps keep a margin for larger models (heun: 49 NFE); dpmpp2m reached DDPM-1000 at 20 on the v model.
DEFAULT_STEPS: dict[Sampler, int] = {"ddim": 50, "ddpm": 100, "dpmpp2m": 25, "rflow": 25, "heun": 25}
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) → network output
Predict = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (x (B,C,H,W), i) → (x̂₀, ε̂)
Trace = list[torch.Tensor]  # x snapshots after each step, each (B, C, H, W)


class StackedNoise:
    """One CPU generator per sample; ``randn(shape, device)`` → (B, *shape) float32, row i from generator i."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device)


def model_evals(sampler: Sampler, steps: int) -> int:
    """Network evaluations (NFE) per image: Heun 2N − 1 (its last step is Euler), the others N."""
    return 2 * steps - 1 if sampler == "heun" else steps


def predictor(denoise: Denoiser, grid: Grid, kind: Parameterization, clip: bool = False) -> Predict:
    """(x, i) → (x̂₀, ε̂) in float32 at grid point i; ``clip`` clamps x̂₀ to [-1, 1] (data range)."""

    def predict(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = grid.t[i].to(x.device).expand(x.shape[0])  # (B,)
        x0, eps = to_x0_eps(denoise(x, t), x, grid.a[i].item(), grid.b[i].item(), kind)
        return (x0.clamp(-1, 1), eps) if clip else (x0, eps)

    return predict


def sample_ddim(predict: Predict, grid: Grid, x: torch.Tensor, eta: float, noise: StackedNoise | None = None,
                trace: Trace | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from x = x_T (B, C, H, W) over ``grid``; returns x₀ (B, C, H, W).

    x_{i+1} = a_{i+1} x̂₀ + √(b_{i+1}² − σ_i²) ε̂ + σ_i z, with σ_i = η (b_{i+1}/b_i) √(1 − a_i²/a_{i+1}²)
    (eq. 16 in a, b form). η = 0: deterministic DDIM; η = 1: DDPM's ancestral sampler (Ho et al. 2020,
    Alg. 2) on the respaced chain, z drawn per sample from ``noise`` (one draw per step with σ_i > 0).
    """
    x = x.float()
    for i in range(grid.steps):
        x0, eps = predict(x, i)
        a, b, a1, b1 = (v.item() for v in (grid.a[i], grid.b[i], grid.a[i + 1], grid.b[i + 1]))
        sigma = eta * (b1 / b) * math.sqrt(max(0.0, 1 - (a / a1) ** 2))
        x = a1 * x0 + math.sqrt(max(0.0, b1 ** 2 - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * noise.randn(tuple(x.shape[1:]), x.device)
        if trace is not None:
            trace.append(x.detach().cpu())
    return x


def sample_dpmpp2m(predict: Predict, grid: Grid, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) in x̂₀ form; returns x₀ (B, C, H, W).

    With λ = log(a/b) and h_i = λ_{i+1} − λ_i: x_{i+1} = (b_{i+1}/b_i) x − a_{i+1} (e^{−h_i} − 1) D_i,
    D_i = (1 + 1/(2r_i)) x̂₀_i − 1/(2r_i) x̂₀_{i−1}, r_i = h_{i−1}/h_i (eq. 18); first order (D_i = x̂₀_i)
    on the first step and on the last one, which goes to b = 0 (λ = ∞): there x₀ = x̂₀, as diffusers'
    ``lower_order_final`` does below 15 steps and its ``final_sigmas_type="zero"`` at any N.
    """
    x, prev, h_prev = x.float(), None, None
    lam = (grid.a / grid.b).log()  # (N+1,) λ_i; +inf at the clean end
    for i in range(grid.steps):
        x0, _ = predict(x, i)
        if i == grid.steps - 1:
            x = x0
        else:
            h = (lam[i + 1] - lam[i]).item()
            d = x0 if prev is None else x0 + (x0 - prev) * (h / (2 * h_prev))  # (1 + 1/2r) x̂₀_i − 1/2r x̂₀_{i−1}
            x = (grid.b[i + 1] / grid.b[i]).item() * x - grid.a[i + 1].item() * math.expm1(-h) * d
            prev, h_prev = x0, h
        if trace is not None:
            trace.append(x.detach().cpu())
    return x


def sample_euler(predict: Predict, grid: Grid, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
    """Euler steps of the rectified-flow ODE dx/ds = ε − x₀ (Liu et al. 2022, eq. 1) from s = 1 to s = 0.

    x_{i+1} = x_i + (s_{i+1} − s_i)(ε̂ − x̂₀), s = b; Σ (s_{i+1} − s_i) = −1 exactly (float32 grid ends
    at 1 and 0). Returns x₀ (B, C, H, W).
    """
    x = x.float()
    for i in range(grid.steps):
        x0, eps = predict(x, i)
        x = x + (grid.b[i + 1] - grid.b[i]).item() * (eps - x0)
        if trace is not None:
            trace.append(x.detach().cpu())
    return x


def sample_heun(predict: Predict, grid: Grid, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
    """Heun's 2nd-order method on the rectified-flow ODE (Karras et al. 2022, Alg. 1 without churn).

    d_i = ε̂ − x̂₀ at (x_i, s_i); Euler to x′ at s_{i+1}; then x_{i+1} = x_i + Δs (d_i + d′)/2 with d′ at
    (x′, s_{i+1}); the last step (to s = 0) stays Euler, so NFE = 2N − 1. Returns x₀ (B, C, H, W).
    """
    x = x.float()
    for i in range(grid.steps):
        x0, eps = predict(x, i)
        ds, d = (grid.b[i + 1] - grid.b[i]).item(), eps - x0
        x_next = x + ds * d
        if i < grid.steps - 1:
            x0_next, eps_next = predict(x_next, i + 1)
            x_next = x + ds * 0.5 * (d + eps_next - x0_next)
        x = x_next
        if trace is not None:
            trace.append(x.detach().cpu())
    return x


def run_sampler(sampler: Sampler, predict: Predict, grid: Grid, x_T: torch.Tensor, noise: StackedNoise,
                trace: Trace | None = None) -> torch.Tensor:
    """Dispatch by name: x_T (B, C, H, W) → x₀ (B, C, H, W) float32."""
    if sampler in ("ddim", "ddpm"):
        return sample_ddim(predict, grid, x_T, 1.0 if sampler == "ddpm" else 0.0, noise, trace)
    fn = {"dpmpp2m": sample_dpmpp2m, "rflow": sample_euler, "heun": sample_heun}[sampler]
    return fn(predict, grid, x_T, trace)


def classifier_free_guidance(net: torch.nn.Module, y: torch.Tensor, null_class: int, scale: float) -> Denoiser:
    """ε̃(x_t, y) = ε(x_t, ∅) + s·(ε(x_t, y) − ε(x_t, ∅))  (Ho & Salimans 2022, eq. 6 with s = 1 + w).

    Conditional and null labels go through the network in one batched forward (2B rows); the
    combination is float32 even when the network runs in bf16. s = 1 is plain conditional sampling.
    """
    if scale == 1.0:
        return lambda x, t: net(x, timesteps=t, class_labels=y).float()
    null = torch.full_like(y, null_class)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = net(torch.cat([x, x]), timesteps=torch.cat([t, t]), class_labels=torch.cat([y, null]))  # (2B,C,H,W)
        cond, uncond = out.float().chunk(2)  # each (B, C, H, W)
        return uncond + scale * (cond - uncond)

    return denoise


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (B, C, H, W) → uint8 (B, C, H, W)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
