"""The optimisation state of an autoencoder run and one step of it: L1 + (KL | VQ) (+ perceptual)
for the autoencoder, and after ``adv_warmup_steps`` a least-squares ``PatchDiscriminator`` game
(Esser et al. 2021; MONAI ``2d_ldm_tutorial``: ``if epoch > autoencoder_warm_up_n_epochs``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from meddiff.models.autoencoders import Autoencoder, build_autoencoder
from meddiff.models.perceptual import PerceptualLoss
from meddiff.train.ae_config import AERunPlan


@dataclass
class AEState:
    """Autoencoder + its Adam, the patch discriminator + its Adam, and the loss weights."""

    ae: Autoencoder
    disc: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    plan: AERunPlan
    perceptual: PerceptualLoss | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"autoencoder": self.ae.state_dict(), "discriminator": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ae.load_state_dict(state["autoencoder"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])

    def adversarial_on(self, step: int) -> bool:
        return self.plan.cfg.adv_weight > 0 and step >= self.plan.cfg.adv_warmup_steps


def build_ae_state(plan: AERunPlan, device: torch.device) -> AEState:
    """Fresh weights (from the current torch seed) on ``device``."""
    from monai.networks.nets import PatchDiscriminator

    ae = build_autoencoder(plan.definition, plan.dataset.channels).to(device)
    disc = PatchDiscriminator(spatial_dims=2, channels=plan.train.disc_channels, in_channels=plan.dataset.channels,
                              out_channels=1, num_layers_d=plan.train.disc_layers).to(device)
    perceptual = PerceptualLoss(plan.cfg.perceptual_weights).to(device) if plan.cfg.perceptual_weights else None
    return AEState(ae, disc, torch.optim.Adam(ae.parameters(), lr=plan.cfg.lr),
                   torch.optim.Adam(disc.parameters(), lr=plan.train.disc_lr), plan, perceptual)


def _lsgan(logits: list[torch.Tensor], real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al. 2017, Eq. 2) on the last discriminator output."""
    target = torch.ones_like(logits[-1]) if real else torch.zeros_like(logits[-1])
    return torch.nn.functional.mse_loss(logits[-1], target)


def ae_losses(st: AEState, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Generator objective for x: (B, C, H, W) in [-1, 1] → (total, named terms, x̂)."""
    cfg = st.plan.cfg
    x_hat, reg = st.ae(x)
    terms = {"l1": (x_hat - x).abs().mean()}
    if "kl" in reg:
        terms["kl"] = reg["kl"]
        total = terms["l1"] + cfg.kl_weight * reg["kl"]
    else:
        terms["vq"] = reg["vq"]
        total = terms["l1"] + reg["vq"]  # VQ loss already carries β·commitment (van den Oord et al. 2017, Eq. 3)
    if st.perceptual is not None:
        terms["perceptual"] = st.perceptual(x, x_hat)
        total = total + cfg.perceptual_weight * terms["perceptual"]
    if st.adversarial_on(step):
        terms["gen_adv"] = _lsgan(st.disc(x_hat.contiguous().float()), real=True)
        total = total + cfg.adv_weight * terms["gen_adv"]
    return total, terms, x_hat


def ae_step(st: AEState, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """One step of both players; returns the detached loss terms (``loss`` = the AE's total)."""
    st.opt_g.zero_grad(set_to_none=True)
    total, terms, x_hat = ae_losses(st, x, step)
    total.backward()
    st.opt_g.step()
    if st.adversarial_on(step):
        st.opt_d.zero_grad(set_to_none=True)
        fake = _lsgan(st.disc(x_hat.detach().contiguous()), real=False)
        real = _lsgan(st.disc(x.contiguous()), real=True)
        terms["disc"] = (fake + real) / 2
        terms["disc"].backward()
        st.opt_d.step()
    return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}


@torch.no_grad()
def val_loss(st: AEState, val: list[torch.Tensor]) -> float:
    """L1 reconstruction error on fixed val batches (the same images every time: a smooth curve)."""
    st.ae.eval()
    errs = [(st.ae(x)[0] - x).abs().mean().item() for x in val]
    st.ae.train()
    return sum(errs) / max(len(errs), 1)
