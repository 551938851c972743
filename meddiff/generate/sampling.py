"""Sampling one batch of a cohort: the model's sampler and guidance checked against the request, then
images from their own seeds (``generate_images``)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from meddiff.errors import MeddiffError
from meddiff.generate import latent
from meddiff.generate.spec import CohortSpec
from meddiff.models.diffusion import build_scheduler
from meddiff.models.samplers import (Sampler, classifier_free_guidance, initial_noise, sample_ddim, sample_rflow,
                                     step_generators, to_uint8)
from meddiff.models.trained import TrainedModel

DEFAULT_GUIDANCE = 2.0  # CFG scale used for conditional models when the spec leaves it unset


def resolve_sampler(spec: CohortSpec, model: TrainedModel) -> CohortSpec:
    """``sampler="auto"`` → the model's natural sampler: rflow for rectified flow, ddim for DDPM."""
    if spec.sampler != "auto":
        return spec
    return dataclasses.replace(spec, sampler="rflow" if model.objective == "rflow" else "ddim")


def check_compatible(spec: CohortSpec, model: TrainedModel) -> float | None:
    """The guidance scale to use; raises for a spec the model cannot serve."""
    if model.objective == "rflow" and spec.sampler != "rflow":
        raise MeddiffError(f"model {model.uri} was trained with rectified flow: use --sampler rflow")
    if model.objective == "ddpm" and spec.sampler == "rflow":
        raise MeddiffError(f"--sampler rflow needs a rectified-flow model; {model.uri} is a DDPM model: "
                           "use --sampler ddim or ddpm")
    limit = int(model.scheduler_config["num_train_timesteps"])
    if spec.steps > limit:
        raise MeddiffError(f"--steps {spec.steps} exceeds the model's {limit} training timesteps")
    if model.mode == "per-class":
        if spec.guidance is not None:
            raise MeddiffError("--guidance applies to conditional models; this model is per-class (unconditional)")
        return None
    return DEFAULT_GUIDANCE if spec.guidance is None else float(spec.guidance)


@torch.no_grad()
def generate_images(model: TrainedModel, class_ids: list[int], seeds: list[int], sampler: Sampler, steps: int,
                    guidance: float | None, device: torch.device, trace: list | None = None) -> torch.Tensor:
    """One batch: uint8 (B, C, H, W) images of ``class_ids`` from their own ``seeds``.

    Per-class models need a single class per batch (the caller groups them).
    """
    shape = model.sample_shape  # (C, H, W), or (C_lat, h, w) for latent models
    x_T = initial_noise(seeds, shape, device)  # (B, *shape)
    if model.mode == "conditional":
        y = torch.tensor(class_ids, device=device)
        denoise = classifier_free_guidance(model.networks[None], y, model.null_class, guidance)
    else:
        (cid,) = set(class_ids)
        net = model.networks[cid]
        denoise = lambda x, t: net(x, timesteps=t, class_labels=None)  # noqa: E731
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    scheduler = latent.unclipped(build_sampler_scheduler(model, sampler), model)
    with autocast:
        if sampler == "rflow":
            x0 = sample_rflow(denoise, x_T, scheduler, steps, trace)
        else:
            x0 = sample_ddim(denoise, x_T, scheduler, steps, 1.0 if sampler == "ddpm" else 0.0,
                             step_generators(seeds, device), trace)
    return to_uint8(latent.decode(model, x0)).cpu()  # latent models: decoded through their autoencoder


def build_sampler_scheduler(model: TrainedModel, sampler: Sampler):
    """MONAI scheduler for sampling: the training schedule, as DDIM for ddpm/ddim samplers."""
    if sampler == "rflow":
        return build_scheduler(model.scheduler_config)
    from monai.networks.schedulers import DDIMScheduler

    cfg = model.scheduler_config
    return DDIMScheduler(num_train_timesteps=cfg["num_train_timesteps"], schedule=cfg["schedule"],
                         prediction_type=cfg["prediction_type"], clip_sample=True)
