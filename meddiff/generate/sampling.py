"""Sampling one batch of a cohort: the model's sampler and guidance checked against the request, then
images from their own seeds (``generate_images``)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from meddiff.errors import MeddiffError
from meddiff.generate import latent
from meddiff.generate.spec import CohortSpec
from meddiff.models.diffusion import parameterization, sampling_grid
from meddiff.models.samplers import (AUTO_SAMPLER, DDPM_SAMPLERS, DEFAULT_STEPS, RFLOW_SAMPLERS, Sampler, StackedNoise, classifier_free_guidance,
                                     predictor, run_sampler, to_uint8)
from meddiff.models.trained import TrainedModel

DEFAULT_GUIDANCE = 2.0  # CFG scale for conditional models trained with label dropout, when the spec leaves it unset


def resolve_sampler(spec: CohortSpec, model: TrainedModel) -> CohortSpec:
    """``sampler="auto"`` → the measured best for what the network predicts (``AUTO_SAMPLER``); ``steps=None``
    → that sampler's measured default (``DEFAULT_STEPS``)."""
    sampler = AUTO_SAMPLER[parameterization(model.scheduler_config)] if spec.sampler == "auto" else spec.sampler
    steps = spec.steps or min(DEFAULT_STEPS[sampler], int(model.scheduler_config["num_train_timesteps"]))
    return dataclasses.replace(spec, sampler=sampler, steps=steps)


def label_dropout(model: TrainedModel) -> float | None:
    """The label dropout the model was trained with (model card config), None when not recorded."""
    value = (model.card.get("config") or {}).get("label_dropout")
    return None if value is None else float(value)


def check_compatible(spec: CohortSpec, model: TrainedModel) -> float | None:
    """The guidance scale to use; raises for a spec the model cannot serve."""
    allowed = RFLOW_SAMPLERS if model.objective == "rflow" else DDPM_SAMPLERS
    if spec.sampler not in allowed:
        kind = "a rectified-flow" if model.objective == "rflow" else "a DDPM (ε/v)"
        raise MeddiffError(f"--sampler {spec.sampler} does not apply to {model.uri}: it is {kind} model; "
                           f"use --sampler {' | '.join(allowed)} (or auto)")
    limit = int(model.scheduler_config["num_train_timesteps"])
    if spec.steps > limit:
        raise MeddiffError(f"--steps {spec.steps} exceeds the model's {limit} training timesteps")
    if spec.unconditional:
        if model.mode != "conditional" or not label_dropout(model):
            why = ("it is per-class: sample per class, or train a conditional model with --label-dropout 0.1"
                   if model.mode == "per-class" else f"its card records label_dropout {label_dropout(model)} "
                   "(no trained null label): retrain with --label-dropout 0.1")
            raise MeddiffError(f"--unconditional needs a conditional model trained with label dropout; {model.uri}: "
                               f"{why}")
        return None
    if model.mode == "per-class":
        if spec.guidance is not None:
            raise MeddiffError("--guidance applies to conditional models; this model is per-class (unconditional)")
        return None
    if label_dropout(model) == 0:
        if spec.guidance not in (None, 1.0):
            raise MeddiffError(f"--guidance {spec.guidance} needs the null label, but {model.uri} was trained with "
                               "label_dropout 0: leave --guidance unset (1.0) or retrain with --label-dropout 0.1")
        return 1.0
    return DEFAULT_GUIDANCE if spec.guidance is None else float(spec.guidance)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype the network runs in under autocast on ``device`` (bf16 on CUDA), None = float32."""
    return torch.bfloat16 if device.type == "cuda" else None


def precision(device: torch.device) -> dict[str, str]:
    """What, beside the spec, decides an image's bytes: device type and network dtype (identity, card)."""
    dtype = autocast_dtype(device)
    return {"device_type": device.type, "autocast": str(dtype).removeprefix("torch.") if dtype else "float32"}


@torch.no_grad()
def generate_images(model: TrainedModel, class_ids: list[int], seeds: list[int], sampler: Sampler, steps: int,
                    guidance: float | None, device: torch.device, trace: list | None = None) -> torch.Tensor:
    """One batch: uint8 (B, C, H, W) images of ``class_ids`` from their own ``seeds``; class -1 (conditional
    models) = unconditional, through the null label.

    Per-class models need a single class per batch (the caller groups them). The network runs
    under bf16 autocast on CUDA; guidance and the sampler maths stay float32. DDPM models clip x̂₀
    to the data range [-1, 1] (as the DDIM sampler did with ``clip_sample``); rectified flow does not.
    """
    shape = model.sample_shape  # (C, H, W), or (C_lat, h, w) for latent models
    noise = StackedNoise(seeds)
    x_T = noise.randn(shape, device)  # (B, *shape) from each sample's own CPU generator
    if model.mode == "conditional" and min(class_ids) < 0:  # unconditional: p(x) through the null label
        if max(class_ids) >= 0:
            raise MeddiffError("a batch mixes unconditional (class -1) and class-conditional samples")
        net, null = model.networks[None], torch.full((len(class_ids),), model.null_class, device=device)
        net_denoise = lambda x, t: net(x, timesteps=t, class_labels=null).float()  # noqa: E731
    elif model.mode == "conditional":
        y = torch.tensor(class_ids, device=device)
        net_denoise = classifier_free_guidance(model.networks[None], y, model.null_class, guidance)
    else:
        (cid,) = set(class_ids)
        net = model.networks[cid]
        net_denoise = lambda x, t: net(x, timesteps=t, class_labels=None).float()  # noqa: E731
    dtype = autocast_dtype(device)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            return net_denoise(x, t).float()

    grid = sampling_grid(model.scheduler_config, steps)
    clip = model.objective == "ddpm" and model.autoencoder is None  # scaled latents are not in [-1, 1]
    predict = predictor(denoise, grid, parameterization(model.scheduler_config), clip=clip)
    x0 = run_sampler(sampler, predict, grid, x_T, noise, trace)
    return to_uint8(latent.decode(model, x0)).cpu()  # latent models: decoded through their autoencoder
