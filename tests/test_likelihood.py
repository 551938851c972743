"""Likelihood: the variational bound (bits/dim) on Gaussian data, whose exact NLL is known, with the
exact denoiser of N(μ, σ²) data; and ``meddiff likelihood`` on a tiny model trained on real data."""

from __future__ import annotations

import math

import pytest
import torch

from meddiff.errors import MeddiffError
from meddiff.models.diffusion import build_scheduler
from meddiff.models.likelihood import bits_per_dim, timestep_strata, vlb_terms

MU, SD = 0.1, 0.4  # data: every pixel ~ N(MU, SD²) independently


def _abar(T: int) -> torch.Tensor:
    cfg = {"objective": "ddpm", "num_train_timesteps": T, "schedule": "linear_beta", "prediction_type": "epsilon"}
    return build_scheduler(cfg).alphas_cumprod.double()


def exact_denoiser(abar: torch.Tensor):
    """ε̂(x_t, t) from E[x_0 | x_t] of Gaussian data: μ + √ᾱ σ² / (ᾱσ² + 1 − ᾱ) · (x_t − √ᾱ μ)."""
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t].view(-1, 1, 1, 1)
        x0 = MU + a.sqrt() * SD**2 / (a * SD**2 + 1 - a) * (x.double() - a.sqrt() * MU)
        return (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
    return denoise


@pytest.fixture(scope="module")
def gaussian_data() -> torch.Tensor:
    return MU + SD * torch.randn(32, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_vlb_approaches_the_true_nll_from_above_as_T_grows(gaussian_data):
    x0, dims = gaussian_data, 32 * 32
    true = bits_per_dim((0.5 * ((x0 - MU) / SD) ** 2 + math.log(SD) + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1),
                        dims).mean().item()
    vlb = {}
    for T in (10, 100, 1000):
        abar = _abar(T)
        terms = vlb_terms(exact_denoiser(abar), x0, abar, "epsilon", None, torch.Generator().manual_seed(1),
                          decoder="continuous")
        vlb[T] = bits_per_dim(terms["total"], dims).mean().item()
    assert vlb[10] > vlb[100] > vlb[1000] > true - 0.005, (vlb, true)  # an upper bound, tightening with T
    assert vlb[1000] - true < 0.03, (vlb, true)
    assert vlb[10] - true > 0.2  # a coarse chain is visibly loose: the test can fail


def test_strided_estimate_is_unbiased_for_the_full_chain(gaussian_data):
    abar, dims = _abar(1000), 32 * 32
    den = exact_denoiser(abar)
    full = bits_per_dim(vlb_terms(den, gaussian_data, abar, "epsilon", None, torch.Generator().manual_seed(2),
                                  decoder="continuous")["total"], dims).mean().item()
    est = [bits_per_dim(vlb_terms(den, gaussian_data, abar, "epsilon", 40, torch.Generator().manual_seed(s),
                                  decoder="continuous")["total"], dims).mean().item() for s in range(4)]
    assert abs(sum(est) / len(est) - full) < 0.03, (est, full)
    idx, w = timestep_strata(1000, 40, torch.Generator().manual_seed(0))
    assert sum(w) == 999 and idx[0] == 1 and len(idx) <= 40


def test_discretized_bound_upper_bounds_the_nll_of_8bit_gaussian_data():
    z = MU + SD * torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0 = ((z.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # 8-bit grid in [-1, 1]
    normal = torch.distributions.Normal(torch.tensor(MU, dtype=torch.float64), torch.tensor(SD, dtype=torch.float64))
    hi = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
    lo = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
    true = bits_per_dim(-(hi - lo).log().flatten(1).sum(1), 256).mean().item()  # exact NLL of the 8-bit data
    abar = _abar(1000)
    vlb = bits_per_dim(vlb_terms(exact_denoiser(abar), x0, abar, "epsilon", 100,
                                 torch.Generator().manual_seed(5))["total"], 256).mean().item()
    assert true < vlb < true + 1.0, (vlb, true)


def test_rectified_flow_models_are_refused_with_a_clear_message():
    from types import SimpleNamespace

    from meddiff.models.likelihood import check_ddpm

    with pytest.raises(MeddiffError, match="DDPM models only"):
        check_ddpm(SimpleNamespace(uri="m", objective="rflow"))


def test_likelihood_command_on_a_tiny_breastmnist_model(tiny_per_class_model_uri, breastmnist_uri):
    from typer.testing import CliRunner

    from meddiff import storage
    from meddiff.cli import app

    args = ["likelihood", tiny_per_class_model_uri, breastmnist_uri, "--split", "test", "--max-images", "24",
            "--timesteps", "8", "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "likelihood" in res.output and "24/24" in res.output  # the progress bar, at its end
    rec = storage.read_json(res.output.strip().splitlines()[-1])
    bpd = rec["overall"]["bits_per_dim"]
    # a 10-step model is worse than uniform 8-bit noise (8 bits/dim): this pins the plumbing, not quality
    assert 0 < rec["overall"]["ci"][0] <= bpd <= rec["overall"]["ci"][1] < 40
    assert abs(sum(rec["overall"]["terms"].values()) - bpd) < 1e-6
    assert rec["overall"]["n"] == 24 and set(rec["per_class"]) <= {"malignant", "normal, benign"}
    again = CliRunner().invoke(app, args)  # the record is reused, not recomputed
    assert again.exit_code == 0 and again.output.strip().splitlines()[-1] == res.output.strip().splitlines()[-1]
    assert again.output.startswith(f"reusing {rec['uri']}: this model scored the same request before")
    # the dataset defaults to the one the model learned from (it was a required argument)
    implied = CliRunner().invoke(app, [a for a in args if a != breastmnist_uri])
    assert implied.exit_code == 0, implied.output
    assert implied.output.strip().splitlines()[-1] == rec["uri"]


def test_a_second_request_waits_for_the_process_scoring_it_then_reuses_its_record(tiny_per_class_model_uri,
                                                                                   breastmnist_uri, tmp_path):
    """likelihood took no lock: two identical requests at once both scored every image."""
    import shutil

    from held_lock import waits_then_reuses
    from meddiff.models.likelihood import LikelihoodConfig, likelihood

    cfg = LikelihoodConfig(split="test", max_images=12, timesteps=4, device="cpu", seed=5)
    rec = likelihood(tiny_per_class_model_uri, breastmnist_uri, cfg)
    aside = tmp_path / "record.json"
    shutil.move(rec["uri"], aside)  # as if the first request were still scoring
    told, again = waits_then_reuses(lambda told: likelihood(tiny_per_class_model_uri, breastmnist_uri, cfg, told),
                                    rec["uri"], lambda: shutil.move(aside, rec["uri"]))
    assert again["created_at"] == rec["created_at"] and told.counts == []  # no image scored twice
    assert told[-1] == f"reusing {rec['uri']}: this model scored the same request before"
