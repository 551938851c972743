"""Every sampler against the exact denoiser of Gaussian data, where the truth is known in closed form.

Data x₀ ~ N(μ, σ²) per pixel; at x_t = a·x₀ + b·ε the exact posterior mean is
E[x₀ | x_t] = μ + a σ² / (a² σ² + b²) · (x_t − a μ), turned into each objective's network output
(ε, v or the rectified-flow velocity). Starting from the exact marginal at the grid's first point, a
perfect sampler returns N(μ, σ²): the error |mean − μ| + |std − σ| is the sampler's discretisation
error alone (x_T is standardised, so the deterministic samplers carry no Monte-Carlo error).
"""

from __future__ import annotations

import math

import pytest
import torch

from meddiff.models.diffusion import (ddpm_grid, parameterization, rflow_grid, sampling_grid, scheduler_config,
                                      build_scheduler)
from meddiff.models.samplers import (DDPM_SAMPLERS, RFLOW_SAMPLERS, StackedNoise, model_evals, predictor,
                                     run_sampler, sample_euler)

MU, SIGMA, T = 0.3, 0.5, 1000
N_IMAGES, SHAPE = 512, (1, 8, 8)  # 32k pixel values: Monte-Carlo error of the ancestral sampler ≈ 3e-3
KINDS = {"ddim": "epsilon", "ddpm": "epsilon", "dpmpp2m": "epsilon", "rflow": "velocity", "heun": "velocity"}
SAMPLERS = list(KINDS)
# error bound at 100 steps (measured: ddim 0.015, ddpm 0.032 ± Monte-Carlo, dpmpp2m 0.0008, rflow 0.0074, heun 8e-5)
CONVERGED = {"ddim": 0.02, "ddpm": 0.045, "dpmpp2m": 0.002, "rflow": 0.01, "heun": 3e-4}


def _ddpm_config(prediction: str = "epsilon", schedule: str = "linear") -> dict:
    return scheduler_config("ddpm", schedule, "v" if prediction == "v_prediction" else "epsilon", T, 28)


ALPHAS_CUMPROD = build_scheduler(_ddpm_config()).alphas_cumprod  # (T,) MONAI's linear ᾱ


def exact_denoiser(kind: str, alphas_cumprod: torch.Tensor = ALPHAS_CUMPROD):
    """The Bayes-optimal network for Gaussian data, in the output convention of ``kind``."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = t[0].item()  # one time per batch in every sampler
        if kind == "velocity":
            a, b = 1 - t0 / T, t0 / T
        else:
            ab = alphas_cumprod[int(t0)].item()
            a, b = math.sqrt(ab), math.sqrt(1 - ab)
        x0 = MU + a * SIGMA ** 2 / (a * a * SIGMA ** 2 + b * b) * (x - a * MU)  # E[x₀ | x_t]
        eps = (x - a * x0) / b
        return {"epsilon": eps, "v_prediction": a * eps - b * x0, "velocity": x0 - eps}[kind]

    return denoise


def grid_for(kind: str, steps: int):
    return rflow_grid(T, steps) if kind == "velocity" else ddpm_grid(ALPHAS_CUMPROD, steps)


def run(sampler: str, steps: int, kind: str | None = None, seeds: list[int] | None = None) -> torch.Tensor:
    """Sample N_IMAGES (or one per seed) from the exact marginal at the grid's first point: (B, *SHAPE)."""
    kind = kind or KINDS[sampler]
    grid = grid_for(kind, steps)
    noise = StackedNoise(list(range(N_IMAGES)) if seeds is None else seeds)
    z = noise.randn(SHAPE)  # (B, 1, 8, 8)
    if seeds is None:
        z = (z - z.mean()) / z.std()  # exactly standard: no Monte-Carlo error for the ODE samplers
    a0, b0 = grid.a[0].item(), grid.b[0].item()
    x_T = a0 * MU + math.sqrt(a0 * a0 * SIGMA ** 2 + b0 * b0) * z  # the exact marginal at grid point 0
    return run_sampler(sampler, predictor(exact_denoiser(kind), grid, kind), grid, x_T, noise)


def error(sampler: str, steps: int, kind: str | None = None) -> float:
    out = run(sampler, steps, kind)
    return abs(out.mean().item() - MU) + abs(out.std().item() - SIGMA)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_converges_to_the_data_distribution(sampler):
    errs = [error(sampler, n) for n in (5, 20, 100)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < CONVERGED[sampler], errs


def test_second_order_solvers_converge_faster():
    ratio = {s: error(s, 10) / error(s, 20) for s in SAMPLERS if s != "ddpm"}  # ≈ 2 for order 1, ≈ 4 for order 2
    assert ratio["ddim"] < 2.3 and ratio["rflow"] < 2.3, ratio
    assert ratio["dpmpp2m"] > 3.2 and ratio["heun"] > 3.2, ratio
    assert error("dpmpp2m", 20) < error("ddim", 20) / 2 and error("heun", 10) < error("rflow", 10) / 4


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_eps_and_v_models_give_the_same_images(prediction):
    for sampler in DDPM_SAMPLERS:
        assert torch.allclose(run(sampler, 13, prediction), run(sampler, 13, "epsilon"), atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [7, 13, 64])
def test_awkward_step_counts_are_as_good_as_their_neighbours(sampler, steps):
    """Off-grid steps (MONAI 1.6.1 DDIM at 7 steps, float16 RFlow time at 64) would stand out here."""
    e = {n: error(sampler, n) for n in (steps - 1, steps, steps + 1)}
    assert e[steps] <= 1.05 * max(e[steps - 1], e[steps + 1]) + (8e-3 if sampler == "ddpm" else 0), e


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batch_size_and_composition_do_not_change_an_image(sampler):
    seeds = [11, 22, 33, 44, 55]
    whole = run(sampler, 9, seeds=seeds)
    parts = torch.cat([run(sampler, 9, seeds=seeds[:2]), run(sampler, 9, seeds=seeds[2:])])
    assert torch.equal(whole, parts)
    other = run(sampler, 9, seeds=[99, 33, 7])  # seed 33 among other samples, at another position
    assert torch.equal(other[1], whole[2])


def test_ddpm_grid_is_exact_for_any_step_count():
    for steps in (1, 7, 10, 13, 64, 999, 1000):
        g = ddpm_grid(ALPHAS_CUMPROD, steps)
        tau = g.t[:-1].long()  # (N,) scheduled MONAI timesteps, strictly decreasing from T − 1
        assert tau[0] == T - 1 and (tau[:-1] > tau[1:]).all() and len(tau) == steps
        assert torch.allclose(g.a[:-1] ** 2, ALPHAS_CUMPROD[tau].float()) and g.a[-1] == 1 and g.b[-1] == 0
    assert torch.equal(ddpm_grid(ALPHAS_CUMPROD, T).t[:-1].long(), torch.arange(T - 1, -1, -1))  # the full chain


@pytest.mark.parametrize("steps", [7, 30, 50, 64])
def test_rflow_euler_integrates_exactly_one_unit_of_time(steps):
    g = rflow_grid(T, steps)
    assert g.b[0] == 1 and g.b[-1] == 0 and (g.b[1:] - g.b[:-1]).double().sum() == -1  # Σ Δs = −1 exactly
    x = torch.zeros(1, 1, 1, 1)
    const = lambda x, i: (torch.zeros_like(x), torch.ones_like(x))  # noqa: E731 (ε̂ − x̂₀ = 1: dx/ds = 1)
    assert abs(sample_euler(const, g, x).item() + 1) < 1e-6  # x(0) = x(1) − 1
    assert model_evals("heun", steps) == 2 * steps - 1 and model_evals("rflow", steps) == steps


def _dummy_denoiser(kind: str):
    """A fixed smooth nonlinear 'network' (weights from a seeded CPU generator): (x, t) → (B, C, H, W)."""
    w = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(0))

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w * x + t.view(-1, 1, 1, 1) / T - 0.5)

    return denoise


# Golden values: the mean and mean |x| of 4 images (1, 8, 8) after 10 steps (5 for ddpm and heun) from a
# seeded dummy network on MONAI's linear schedule; a MONAI or maths change that moves images shows here.
GOLDEN = {"ddim": (0.731123, 0.832468), "ddpm": (0.146976, 0.657784), "dpmpp2m": (-0.095023, 0.789422),
          "rflow": (0.030406, 0.862280), "heun": (0.010562, 0.867989)}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_golden_values_on_a_dummy_network(sampler):
    objective = "rflow" if sampler in RFLOW_SAMPLERS else "ddpm"
    cfg = scheduler_config(objective, "linear", "epsilon", T, 8)
    grid = sampling_grid(cfg, 5 if sampler in ("ddpm", "heun") else 10)
    noise = StackedNoise([1, 2, 3, 4])
    x = run_sampler(sampler, predictor(_dummy_denoiser(parameterization(cfg)), grid, parameterization(cfg),
                                       clip=objective == "ddpm"), grid, noise.randn((1, 8, 8)), noise)
    assert (round(x.mean().item(), 6), round(x.abs().mean().item(), 6)) == pytest.approx(GOLDEN[sampler], abs=2e-5)


def test_sampler_maths_stay_float32_when_the_network_runs_in_bf16():
    """A bf16 network (as under CUDA autocast): guidance and every update are computed in float32."""
    from meddiff.models.samplers import classifier_free_guidance

    class Bf16Net(torch.nn.Module):
        def forward(self, x, timesteps, class_labels):
            return (0.1 * x + class_labels.view(-1, 1, 1, 1)).to(torch.bfloat16)

    y = torch.tensor([0, 1])
    cfg = classifier_free_guidance(Bf16Net(), y, null_class=2, scale=2.0)
    out = cfg(torch.randn(2, 1, 4, 4), torch.tensor([5.0, 5.0]))
    assert out.dtype == torch.float32
    for sampler in SAMPLERS:
        kind = KINDS[sampler]
        grid, noise = grid_for(kind, 4), StackedNoise([1, 2])
        x = run_sampler(sampler, predictor(cfg, grid, kind), grid, noise.randn((1, 4, 4)), noise)
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
