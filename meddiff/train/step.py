"""The optimisation state of one network and one training step (shared by training and the bench)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from meddiff.models.diffusion import Prediction, diffusion_loss
from meddiff.models.networks import build_network
from meddiff.models.networks import Conditioning, NetworkConfig


@dataclass
class TrainingState:
    """Raw network, its EMA copy (what sampling uses), AdamW and the warm-up LR schedule."""

    net: torch.nn.Module
    ema: AveragedModel
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LambdaLR

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "lr_scheduler": self.lr_sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_scheduler"])


def ema_with_warmup(decay: float):
    """EMA update with warm-up: decay_n = min(decay, (1 + n) / (10 + n)) after n updates, so short runs
    are not dominated by the initial weights (0.99^100 would leave 37 % of them after 100 steps)."""
    def update(ema_params, params, num_averaged) -> None:
        n = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(ema_params, params, num_averaged)
    return update


def build_training_state(network: NetworkConfig, channels: int, num_class_embeds: int | None, device: torch.device,
                         lr: float, weight_decay: float, warmup_steps: int, ema_decay: float,
                         conditioning: Conditioning = "embedding") -> TrainingState:
    """Fresh weights (from the current torch seed) on ``device``; channels-last on CUDA."""
    net = build_network(network, channels, num_class_embeds, conditioning).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(warmup_steps, 1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))  # linear warm-up
    return TrainingState(net, ema, opt, lr_sched)


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability p (classifier-free guidance). y: (B,) → (B,)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def train_step(model: torch.nn.Module, state: TrainingState, scheduler, x: torch.Tensor, labels: torch.Tensor | None,
               prediction: Prediction, min_snr_gamma: float | None, grad_clip: float,
               autocast: torch.autocast, generator: torch.Generator | None = None) -> torch.Tensor:
    """One AdamW step on a batch x: (B, C, H, W) in [-1, 1]; updates the EMA. Returns the loss (no sync).

    ``model`` is what runs the forward pass: ``state.net`` itself, or its DDP / compiled wrapper.
    ``generator``: the part's own stream for ε and t (None: torch's global one).
    """
    with autocast:
        loss = diffusion_loss(model, x, labels, scheduler, prediction, min_snr_gamma, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.net.parameters(), grad_clip)
    state.opt.step()
    state.lr_sched.step()
    state.opt.zero_grad(set_to_none=True)
    state.ema.update_parameters(state.net)
    return loss.detach()
