"""Validation loss on fixed draws: the same val images, timesteps and noise at every evaluation, so the
curve moves only when the network does (MONAI's tutorials redraw t each time, so theirs is mostly noise).

Not yet called by the training loop: ``loop.train_part`` would build one ``ValProbe`` per part (when
the dataset has a val split) and log ``probe.loss(state.ema.module)`` as ``val_loss`` beside ``loss``
at every ``log_every`` step; ``records.write_loss_curve`` then draws both.
"""

from __future__ import annotations

from dataclasses import dataclass

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
               seed: int = 0) -> ValProbe | None:
    """Draw the probe once from val images (N, C, H, W) in [0, 1] with labels (N,); None without images.

    class_id: keep that class only and drop the labels (per-class networks); None keeps all, labelled.
    """
    from meddiff.models.diffusion import sample_timesteps

    if class_id is not None:
        images, labels = images[labels == class_id], None
    if len(images) == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:n]
    x0 = images[idx].float() * 2 - 1  # [0, 1] → [-1, 1]
    eps = torch.randn(x0.shape, generator=g)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # sample_timesteps draws from the global stream (MONAI's RFlow sampler too)
    t = sample_timesteps(scheduler, x0)
    torch.random.set_rng_state(state)
    return ValProbe(x0, None if labels is None else labels[idx], t, eps)
