"""Validation loss on fixed draws: the same val images, timesteps and noise at every evaluation, so the
curve moves only when the network does (MONAI's tutorials redraw t each time, so theirs is mostly noise).

``loop.train_part`` builds one probe per part (``load_probe``; when the dataset has a val split) and
logs ``probe.loss(ema_net)`` as ``val_loss`` on every checkpoint's metrics row; ``records.write_loss_curve``
and the evaluation report draw it beside the training loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from meddiff.models.diffusion import ddpm_target, rflow_target, weighted_mse


@dataclass
class ValProbe:
    """Fixed (x_0, y, t, ε) draws from the val split: x0, eps (N, C, H, W); y, t (N,)."""

    x0: torch.Tensor
    y: torch.Tensor | None  # class labels for a conditional network; None for a per-class one
    t: torch.Tensor
    eps: torch.Tensor

    @torch.no_grad()
    def loss(self, net: torch.nn.Module, scheduler, prediction: str = "epsilon", batch: int = 256) -> float:
        """Mean training-objective MSE of ``net`` (e.g. the EMA network) on the fixed draws."""
        from monai.networks.schedulers import RFlowScheduler

        was_training, total = net.training, 0.0
        net.eval()
        dev = next(net.parameters()).device
        for s in range(0, len(self.x0), batch):
            x0, eps, t = (v[s:s + batch].to(dev) for v in (self.x0, self.eps, self.t))
            y = None if self.y is None else self.y[s:s + batch].to(dev)
            x_t = scheduler.add_noise(original_samples=x0, noise=eps, timesteps=t)  # (B, C, H, W)
            target = rflow_target(x0, eps) if isinstance(scheduler, RFlowScheduler) else \
                ddpm_target(x0, eps, t, scheduler.alphas_cumprod, prediction)
            total += float(weighted_mse(net(x_t, timesteps=t, class_labels=y), target)) * len(x0)
        net.train(was_training)
        return total / len(self.x0)


def make_probe(images: torch.Tensor, labels: torch.Tensor, scheduler, class_id: int | None, n: int = 256,
               seed: int = 0, encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ValProbe | None:
    """Draw the probe once from val images (N, C, H, W) in [0, 1] with labels (N,); None without images.

    class_id: keep that class only and drop the labels (per-class networks); None keeps all, labelled.
    encode: latent diffusion's x ∈ [-1, 1] → z = scale · E(x); the probe then holds latents.
    """
    from meddiff.models.diffusion import sample_timesteps

    if class_id is not None:
        images, labels = images[labels == class_id], None
    if len(images) == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:n]
    x0 = images[idx].float() * 2 - 1  # [0, 1] → [-1, 1]
    if encode is not None:
        with torch.no_grad():
            x0 = encode(x0).float().cpu()  # (n, C_lat, h, w)
    eps = torch.randn(x0.shape, generator=g)
    t = sample_timesteps(scheduler, x0, torch.Generator().manual_seed(seed))  # (n,); never the global stream
    return ValProbe(x0, None if labels is None else labels[idx], t, eps)


def load_probe(dataset, class_id: int | None, scheduler, n: int = 256, seed: int = 0,
               encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ValProbe | None:
    """The probe of one part from the dataset's val split, read shard by shard until ``n`` images of the
    part's class(es) are in hand (a large val split is never loaded whole); None without val images."""
    from meddiff.data.shards import load_shards

    xs, ys, have = [], [], 0
    for uri in dataset.shard_uris("val") if dataset.card["shards"].get("val") else []:
        x, y = load_shards([uri])  # uint8 (N, C, H, W), int (N,)
        if not len(y):
            continue
        xs.append(x), ys.append(y)
        have += int(len(y) if class_id is None else (y == class_id).sum())
        if have >= n:
            break
    if not xs:
        return None
    images = torch.from_numpy(np.concatenate(xs)).float() / 255  # (N, C, H, W) in [0, 1]
    return make_probe(images, torch.from_numpy(np.concatenate(ys)), scheduler, class_id, n, seed, encode)
