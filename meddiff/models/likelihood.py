"""Negative log-likelihood of a DDPM model in bits/dim, through the variational bound of Ho et al. 2020.

For 8-bit images x_0 scaled to [-1, 1] (D = C·H·W values) and the model's schedule ᾱ (index
i = 0 … T-1 here is the paper's t = i + 1), eq. 5 of the paper bounds −log p_θ(x_0) by

    L = L_T + Σ_{i=1}^{T-1} L_{i-1} + L_0
    L_T     = KL(q(x_{T-1} | x_0) ‖ N(0, I))                         (prior term)
    L_{i-1} = E_q KL(q(x_{i-1} | x_i, x_0) ‖ p_θ(x_{i-1} | x_i))      (eqs. 6-8)
    L_0     = E_q −log p_θ(x_0 | x_1), the discretized Gaussian decoder (eq. 13)

with p_θ(x_{i-1} | x_i) = N(μ̃(x_i, x̂_0), σ_i²), x̂_0 the network's estimate of x_0 and σ_i² = β_i
(``large``, the default: the tighter bound, and the one that converges to the true NLL of Gaussian
data as T grows) or β̃_i (``small``, the posterior variance); the decoder uses σ² = β_0 as the paper
does. Bits/dim = L / (D ln 2). The sum over i may be estimated on K < T-1 timesteps: the
indices 1 … T-1 are cut into K contiguous strata, one index is drawn uniformly in each and weighted
by its stratum's size, so the estimate is unbiased for the bound (with more variance than the full
chain); L_T and L_0 are always exact. Rectified-flow models have no such bound here: they are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import numpy as np
import torch

from meddiff.data.sources import SPLITS
from meddiff.errors import MeddiffError, check_seed
from meddiff.progress import Progress, tell
from meddiff.threads import configure_threads

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) → network output
Prediction = Literal["epsilon", "v_prediction"]  # MONAI's prediction_type names (scheduler_config)
Variance = Literal["large", "small"]  # σ_i² of p_θ(x_{i-1} | x_i): β_i or β̃_i (Ho et al. §3.2)
LN2 = math.log(2.0)


def to_x0(out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: Prediction) -> torch.Tensor:
    """x̂_0 from the network output: ε (Ho et al. eq. 15 inverted) or v (Salimans & Ho 2022, §4).

    out, x_t: (B, C, H, W); abar: (B, 1, 1, 1) ᾱ of each image's timestep.
    """
    if prediction == "epsilon":
        return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
    return abar.sqrt() * x_t - (1 - abar).sqrt() * out


def posterior(x0: torch.Tensor, x_t: torch.Tensor, i: int, abar: torch.Tensor, betas: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ̃ and variance β̃ of q(x_{i-1} | x_i, x_0) (Ho et al. eqs. 6-7); i ≥ 1, abar/betas: (T,)."""
    a_prev, a_i, b_i = abar[i - 1], abar[i], betas[i]
    mean = a_prev.sqrt() * b_i / (1 - a_i) * x0 + (1 - b_i).sqrt() * (1 - a_prev) / (1 - a_i) * x_t
    return mean, (1 - a_prev) / (1 - a_i) * b_i


def gaussian_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, var1) ‖ N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def prior_kl(x0: torch.Tensor, abar_last: torch.Tensor) -> torch.Tensor:
    """L_T per image in nats: KL(N(sqrt(ᾱ_T) x_0, 1 − ᾱ_T) ‖ N(0, 1)) summed over (C, H, W) → (B,)."""
    kl = gaussian_kl(abar_last.sqrt() * x0, (1 - abar_last).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0))
    return kl.flatten(1).sum(1)


def discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """L_0 per image in nats (Ho et al. eq. 13): −log ∫ N(x; mean, std²) over x_0's 8-bit bin.

    x0: (B, C, H, W) on the grid {-1, -1 + 2/255, …, 1}; the edge bins extend to ±∞. Returns (B,).
    """
    upper, lower = (x0 + 1 / 255 - mean) / std, (x0 - 1 / 255 - mean) / std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper): the bin of x = -1
    log_sf_lower = torch.special.log_ndtr(-lower)  # log(1 − Φ(lower)): the bin of x = 1
    mid = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    logp = torch.where(x0 < -0.999, log_cdf_upper, torch.where(x0 > 0.999, log_sf_lower, mid))
    return -logp.flatten(1).sum(1)


def timestep_strata(T: int, k: int | None, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Indices i ∈ [1, T-1] for the KL terms and their weights: all of them (k None or ≥ T-1), or one
    uniform draw in each of ≤ k contiguous strata, weighted by the stratum size (an unbiased sum).

    The strata are log-spaced (the first ones single timesteps), because the KL terms fall off
    roughly like 1/i: uniform strata would hide most of the bound in rare draws near i = 1.
    """
    if k is None or k >= T - 1:
        return list(range(1, T)), [1] * (T - 1)
    edges = np.unique(np.geomspace(1, T, k + 1).round().astype(int))  # stratum j = [edges[j], edges[j+1])
    idx = [int(lo + torch.randint(0, hi - lo, (1,), generator=generator)) for lo, hi in zip(edges[:-1], edges[1:])]
    return idx, [int(hi - lo) for lo, hi in zip(edges[:-1], edges[1:])]


def gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """−log N(x0; mean, std²) summed over (C, H, W) → (B,): the continuous decoder, for continuous data."""
    return (0.5 * ((x0 - mean) / std) ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def vlb_terms(denoise: Denoiser, x0: torch.Tensor, abar: torch.Tensor, prediction: Prediction,
              k: int | None = None, generator: torch.Generator | None = None,
              decoder: Literal["discretized", "continuous"] = "discretized",
              variance: Variance = "large") -> dict[str, torch.Tensor]:
    """The bound's terms per image in nats, each (B,): ``prior`` L_T, ``diffusion`` Σ L_{i-1}
    (exact or stratified estimate), ``decoder`` L_0, and ``total``. x0: (B, C, H, W) in [-1, 1].

    abar: (T,) ᾱ of the model's schedule (float64 recommended). Noise comes from ``generator`` (CPU).
    ``decoder``: the 8-bit discretized L_0 (images), or a continuous Gaussian (continuous data; tests).
    """
    g = generator or torch.Generator().manual_seed(0)
    x0 = x0.to(abar.dtype)
    T = abar.shape[0]
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])  # β_i = 1 − ᾱ_i / ᾱ_{i-1}
    b = x0.shape[0]

    def noised(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        x_t = abar[i].sqrt() * x0 + (1 - abar[i]).sqrt() * eps  # q(x_i | x_0), eq. 4
        t = torch.full((b,), i, device=x0.device, dtype=torch.long)
        out = denoise(x_t.float(), t).to(x0.dtype)
        return x_t, to_x0(out, x_t, abar[i].view(1, 1, 1, 1), prediction)

    diffusion = torch.zeros(b, dtype=x0.dtype, device=x0.device)
    idx, weights = timestep_strata(T, k, g)
    for i, w in zip(idx, weights):
        x_t, x0_hat = noised(i)
        mean_q, var_q = posterior(x0, x_t, i, abar, betas)
        mean_p, _ = posterior(x0_hat, x_t, i, abar, betas)  # μ_θ = μ̃(x_i, x̂_0), eq. 11 in x̂_0 form
        var_p = betas[i] if variance == "large" else var_q
        diffusion += w * gaussian_kl(mean_q, var_q, mean_p, var_p).flatten(1).sum(1)
    _, x0_hat = noised(0)
    nll = discretized_gaussian_nll if decoder == "discretized" else gaussian_nll
    dec = nll(x0, x0_hat, betas[0].sqrt())  # μ̃(x_1, x̂_0) = x̂_0 at i = 0
    prior = prior_kl(x0, abar[-1])
    return {"prior": prior, "diffusion": diffusion, "decoder": dec, "total": prior + diffusion + dec}


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """nats per image (B,) → bits per dimension (B,)."""
    return nats / (dims * LN2)


# --------------------------------------------------------------------------- a trained model on a real split

@dataclass(frozen=True)
class LikelihoodConfig:
    split: str = "test"  # dataset split the bound is computed on: train | val | test
    max_images: int | None = 500  # seeded subsample of the split (CPU budget); None = all
    timesteps: int | None = 100  # K stratified KL timesteps per image (unbiased); None = the full chain of T
    batch_size: int = 64  # images per forward pass
    conditional: bool = True  # conditional models: p(x | y) with the true label; False = p(x) via the null class
    variance: Variance = "large"  # σ_i² of the reverse steps: β_i (large) or β̃_i (small), Ho et al. §3.2
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0  # subsample, strata and noise seed

    def check(self) -> "LikelihoodConfig":
        check_seed(self.seed)
        if self.split not in SPLITS:
            raise MeddiffError(f"split must be train, val or test, not {self.split!r}")
        if self.variance not in get_args(Variance):
            raise MeddiffError(f"variance must be one of {get_args(Variance)}, not {self.variance!r}")
        for name in ("max_images", "timesteps", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise MeddiffError(f"{name} must be ≥ 1, not {v}")
        return self


def model_denoiser(model: Any, class_id: int | None, labels: torch.Tensor | None, conditional: bool) -> Denoiser:
    """The network of ``model`` (a TrainedModel) for one class (per-class) or for labels (conditional)."""
    if model.mode == "per-class":
        net = model.networks[class_id]
        return lambda x, t: net(x, timesteps=t)
    net = model.networks[None]
    y = labels if conditional else torch.full_like(labels, model.null_class)
    return lambda x, t: net(x, timesteps=t, class_labels=y[: x.shape[0]])


def check_ddpm(model: Any) -> None:
    if getattr(model, "autoencoder", None) is not None:
        raise MeddiffError(f"{model.uri} is a latent diffusion model: its bound would be in bits per dimension of "
                           "its autoencoder's latents, not of images, and not comparable with any pixel model's; "
                           "use a model trained without --latent")
    if model.objective != "ddpm":
        raise MeddiffError(f"{model.uri} is a {model.objective} model: the variational bound (bits/dim) is offered "
                           "for DDPM models only (an ODE likelihood for rectified flow is not implemented)")


def model_bits_per_dim(model: Any, images: np.ndarray, labels: np.ndarray, cfg: LikelihoodConfig,
                       progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Per-image bits/dim of uint8 images (N, C, H, W) with class ids (N,): terms ``total``, ``prior``,
    ``diffusion``, ``decoder`` → float64 arrays (N,). Per-class models score each image with its
    class's network (p(x | y)); so do conditional ones unless ``cfg.conditional`` is False."""
    from meddiff.models.diffusion import build_scheduler

    check_ddpm(model)
    sched = build_scheduler(model.scheduler_config)
    device = next(iter(model.networks.values())).parameters().__next__().device
    abar = sched.alphas_cumprod.to(device=device, dtype=torch.float64)
    prediction = model.scheduler_config["prediction_type"]
    dims = int(np.prod(images.shape[1:]))
    out = {k: np.zeros(len(images)) for k in ("total", "prior", "diffusion", "decoder")}
    done = 0
    for sel in batches_by_class(labels, cfg.batch_size, per_class=model.mode == "per-class"):
        x0 = torch.from_numpy(images[sel]).to(device).double() / 127.5 - 1  # [0, 255] → [-1, 1]
        y = torch.from_numpy(labels[sel]).to(device)
        denoise = model_denoiser(model, int(labels[sel[0]]), y, cfg.conditional)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(sel[0]))
        with torch.no_grad():
            terms = vlb_terms(denoise, x0, abar, prediction, cfg.timesteps, g, variance=cfg.variance)
        for name, v in terms.items():
            out[name][sel] = bits_per_dim(v, dims).cpu().numpy()
        done += len(sel)
        if progress is not None:
            progress(done, len(images))
    return out


def batches_by_class(labels: np.ndarray, batch_size: int, per_class: bool) -> list[np.ndarray]:
    """Index batches in order; with ``per_class`` every batch holds one class only."""
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if per_class else [np.arange(len(labels))]
    return [g[s:s + batch_size] for g in groups for s in range(0, len(g), batch_size)]


def summarize(per_image: dict[str, np.ndarray], labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Mean bits/dim overall and per class, with a normal-approximation 95 % CI of the mean."""
    def stat(v: np.ndarray) -> dict[str, Any]:
        half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
        return {"bits_per_dim": float(v.mean()), "ci": [float(v.mean() - half), float(v.mean() + half)], "n": len(v)}

    overall = stat(per_image["total"])
    overall["terms"] = {k: float(per_image[k].mean()) for k in ("prior", "diffusion", "decoder")}
    per_class = {name: stat(per_image["total"][labels == c]) for c, name in enumerate(class_names)
                 if (labels == c).any()}
    return {"overall": overall, "per_class": per_class}


def likelihood(model_uri: str, dataset_uri: str | None = None, cfg: LikelihoodConfig | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Bits/dim of a DDPM model on a real split (of ``dataset_uri``; None: the dataset the model learned from);
    the record is written (atomically) to ``<model>/likelihood/<split>-<hash>.json`` and reused when it exists
    (``progress`` is told so). Returns the record; ``progress(images scored, images)``."""
    from meddiff import storage
    from meddiff.data.shards import open_dataset
    from meddiff.models.trained import dataset_of, load_model
    from meddiff.locks import artifact_lock, tell_waiting
    from meddiff.records import content_hash

    cfg = (cfg or LikelihoodConfig()).check()
    model = load_model(model_uri, cfg.device)
    dataset_uri = dataset_uri or dataset_of(model)
    ds = open_dataset(dataset_uri)
    check_ddpm(model)
    if (ds.image_size, ds.channels) != (model.image_size, model.channels) or ds.class_names != model.class_names:
        raise MeddiffError(f"{dataset_uri} ({ds.channels}×{ds.image_size} px, classes {ds.class_names}) does not "
                           f"match the model ({model.channels}×{model.image_size} px, classes {model.class_names})")
    key = content_hash({"dataset": ds.version, "model": model.checkpoint_sha256,
                        "config": {**vars(cfg), "device": None}})
    uri = storage.join(model.uri, "likelihood", f"{cfg.split}-{key}.json")

    def reused() -> dict[str, Any] | None:
        if not storage.exists(uri):
            return None
        tell(progress, f"reusing {uri}: this model scored the same request before")
        return storage.read_json(uri)

    if (found := reused()) is not None:
        return found
    with artifact_lock(uri, tell_waiting(progress, uri)):  # a second process asking the same waits, then reuses
        return reused() or _score(model, ds, cfg, uri, progress)


def _score(model, ds, cfg: LikelihoodConfig, uri: str, progress: Progress | None) -> dict[str, Any]:
    """Score ``cfg.split`` of ``ds`` (its seeded subsample) and write the record to ``uri``."""
    from meddiff import storage
    from meddiff.records import make_record

    configure_threads()  # CPU threads that fit the machine now, as evaluate's (meddiff.threads)
    images, labels = ds.load_split(cfg.split)
    if len(images) == 0:
        raise MeddiffError(f"{ds.uri} has no {cfg.split} images; pick another --split")
    if cfg.max_images is not None and len(images) > cfg.max_images:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(images), cfg.max_images, replace=False))
        images, labels = images[keep], labels[keep]
    per_image = model_bits_per_dim(model, images, labels, cfg, progress)
    record = make_record("likelihood", cfg, {"model": model.uri, "checkpoint_sha256": model.checkpoint_sha256,
                                             "dataset": ds.uri, "dataset_version": ds.version},
                         estimator=("variational bound (Ho et al. 2020, eq. 5), bits/dim; KL sum over "
                                    + ("all T-1 timesteps" if cfg.timesteps is None else
                                       f"{cfg.timesteps} stratified timesteps (unbiased estimate)")),
                         conditioning="p(x|y)" if model.mode == "per-class" or cfg.conditional else "p(x)",
                         uri=uri, **summarize(per_image, labels, model.class_names))
    storage.write_json(uri, record)
    return record
