"""Latent diffusion at generation time: samplers run on (C_lat, h, w) latents (unclipped) and the
result is decoded through the model's autoencoder, x = D(z / scale_factor)."""

from __future__ import annotations

import numpy as np
import torch

from meddiff.models.samplers import to_uint8
from meddiff.models.trained import TrainedModel


def unclipped(scheduler, model: TrainedModel):
    """Latent models: no x̂₀ clipping to [-1, 1] (scaled latents have unit variance, not unit range)."""
    if model.autoencoder is not None and hasattr(scheduler, "clip_sample"):
        scheduler.clip_sample = False
    return scheduler


def decode(model: TrainedModel, x0: torch.Tensor) -> torch.Tensor:
    """Latents (B, C_lat, h, w) → images (B, C, H, W) in [-1, 1]; images pass through unchanged."""
    if model.autoencoder is None:
        return x0
    return model.autoencoder.from_latent(x0.float())


def latent_frame(z: torch.Tensor, channels: int) -> np.ndarray:
    """A latent (1, C_lat, h, w) shown as a ``channels``-channel uint8 picture (C, h, w), each channel
    min-max scaled: the first ``channels`` latent channels (or the first one, repeated)."""
    z = z[0, :channels] if z.shape[1] >= channels else z[0, :1].expand(channels, -1, -1)
    lo, hi = z.amin(dim=(1, 2), keepdim=True), z.amax(dim=(1, 2), keepdim=True)
    return ((z - lo) / (hi - lo + 1e-8) * 255).round().byte().cpu().numpy()


def trace_frames(model: TrainedModel, trace: list[torch.Tensor], picks: np.ndarray) -> np.ndarray:
    """Frames of one sample's reverse diffusion, (F, C, H, W) uint8. Latent models: each frame is the
    latent (nearest-upsampled to the image size) beside its decoding, side by side (C, H, 2W)."""
    if model.autoencoder is None:
        return np.stack([to_uint8(trace[i])[0].numpy() for i in picks])
    out = []
    for i in picks:
        img = to_uint8(decode(model, trace[i][:1]))[0].numpy()  # (C, H, W)
        lat = latent_frame(trace[i][:1], model.channels)  # (C, h, w)
        k = img.shape[-1] // lat.shape[-1]
        lat = lat.repeat(k, axis=1).repeat(k, axis=2)  # nearest upsampling to ≈ H
        lat = np.pad(lat, ((0, 0), (0, img.shape[1] - lat.shape[1]), (0, img.shape[2] - lat.shape[2])))
        out.append(np.concatenate([lat, img], axis=2))  # (C, H, 2W)
    return np.stack(out)
