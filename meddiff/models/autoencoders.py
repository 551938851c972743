"""The autoencoders of latent diffusion: MONAI ``AutoencoderKL`` (VAE) and ``VQVAE``, their presets
(``AutoencoderPreset``: an ``AutoencoderDef`` per kind + an ``AutoencoderTrain``, MONAI's
``autoencoder_def``/``autoencoder_train`` pair) and ``load_autoencoder`` for a finished run.

Latents: z = scale_factor · E(x) with E the VAE's posterior mean μ (deterministic, so latent shards
and regenerated images are exact) or the VQ-VAE's quantised embedding; x̂ = D(z / scale_factor).
``scale_factor`` = 1 / std(E(x)) over many training batches (Rombach et al. 2022, §4.3.2 / App. G),
so the denoiser sees unit-variance latents. Images are padded to a multiple of the AE's total
down-sampling factor inside ``Autoencoder`` and cropped back after decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from meddiff import storage
from meddiff.errors import ArtifactError, MeddiffError
from meddiff.records import sha256_file

AEKind = Literal["vae", "vqvae"]
AE_CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class AutoencoderDef:
    """Shape of one autoencoder (MONAI's ``autoencoder_def``); one entry per level where a tuple."""

    kind: AEKind = "vae"  # vae = AutoencoderKL (KL-regularised), vqvae = VQVAE (vector-quantised)
    channels: tuple[int, ...] = (16, 32, 32)  # feature channels per level; the image is halved len-1 times
    latent_channels: int = 4  # channels of the latent (VQ: the codebook embedding dimension)
    num_res_blocks: int = 1  # residual blocks per level
    norm_num_groups: int = 8  # GroupNorm groups (VAE); must divide every entry of ``channels``
    attention: bool = False  # VAE: non-local attention in the encoder/decoder bottleneck
    num_embeddings: int = 256  # VQ-VAE: codebook size
    commitment_cost: float = 0.25  # VQ-VAE: β of the commitment term (van den Oord et al. 2017, Eq. 3)

    @property
    def factor(self) -> int:
        """Total down-sampling factor: image H → latent H / factor."""
        return 2 ** (len(self.channels) - 1) if self.kind == "vae" else 2 ** len(self.channels)

    def check(self) -> "AutoencoderDef":
        if self.kind not in get_args(AEKind):
            raise MeddiffError(f"autoencoder kind must be one of {', '.join(get_args(AEKind))}, not {self.kind!r}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if self.kind == "vae" and bad:
            raise MeddiffError(f"autoencoder channels {bad} are not divisible by "
                               f"norm_num_groups={self.norm_num_groups}")
        return self


@dataclass(frozen=True)
class AutoencoderTrain:
    """Defaults of autoencoder training (MONAI's ``autoencoder_train``)."""

    steps: int  # optimiser steps of the autoencoder (and of the discriminator once it is on)
    batch_size: int  # images per step
    lr: float  # Adam learning rate of the autoencoder
    disc_lr: float  # Adam learning rate of the patch discriminator
    kl_weight: float = 1e-6  # VAE: weight of the KL term (MONAI 2d_ldm tutorial)
    adv_weight: float = 0.01  # weight of the generator's adversarial term
    adv_warmup_steps: int = 0  # steps before the discriminator and adversarial loss switch on
    perceptual_weight: float = 0.001  # weight of the perceptual term (only with --perceptual-weights)
    disc_channels: int = 32  # PatchDiscriminator width
    disc_layers: int = 3  # PatchDiscriminator depth
    checkpoint_every: int = 100  # steps between checkpoints (one is always written at the end)
    sample_every: int = 1000  # steps between reconstruction grids (one at the end)
    log_every: int = 10  # steps between metrics.jsonl rows (val loss too)
    scale_batches: int = 20  # training batches the latent scale factor is estimated over


@dataclass(frozen=True)
class AutoencoderPreset:
    """An autoencoder per kind plus training defaults; ``image_sizes`` it is meant for."""

    vae: AutoencoderDef
    vqvae: AutoencoderDef
    train: AutoencoderTrain
    image_sizes: tuple[int, ...] = (28, 64, 128, 224)

    def definition(self, kind: AEKind) -> AutoencoderDef:
        return (self.vae if kind == "vae" else self.vqvae).check()


AE_PRESETS: dict[str, AutoencoderPreset] = {
    # CPU/CI: 4× down-sampling, no attention, ~0.1 M parameters; seconds per 100 steps at 28 px
    "tiny": AutoencoderPreset(
        AutoencoderDef("vae", (16, 32, 32), 4, 1, 8),
        AutoencoderDef("vqvae", (16, 32), 4, 1, 8, num_embeddings=128),
        AutoencoderTrain(steps=200, batch_size=32, lr=2e-3, disc_lr=1e-3, adv_warmup_steps=100,
                         disc_channels=16, disc_layers=2, checkpoint_every=100, sample_every=1000, log_every=20)),
    # one GPU, an hour: 8× down-sampling with bottleneck attention (224 px → 28 × 28 latents)
    "small": AutoencoderPreset(
        AutoencoderDef("vae", (64, 128, 128, 256), 4, 2, 32, attention=True),
        AutoencoderDef("vqvae", (64, 128, 256), 4, 2, 32, num_embeddings=512),
        AutoencoderTrain(steps=20_000, batch_size=32, lr=1e-4, disc_lr=5e-4, adv_warmup_steps=5_000,
                         disc_channels=64, checkpoint_every=2_000, sample_every=5_000, log_every=50)),
    # GPU, a day: MONAI 2d_ldm tutorial widths
    "base": AutoencoderPreset(
        AutoencoderDef("vae", (128, 256, 384, 512), 8, 2, 32, attention=True),
        AutoencoderDef("vqvae", (128, 256, 512), 8, 2, 32, num_embeddings=1024),
        AutoencoderTrain(steps=100_000, batch_size=32, lr=5e-5, disc_lr=2e-4, adv_warmup_steps=20_000,
                         disc_channels=64, checkpoint_every=5_000, sample_every=10_000, log_every=100)),
}


def get_ae_preset(name: str) -> AutoencoderPreset:
    try:
        return AE_PRESETS[name]
    except KeyError:
        raise MeddiffError(f"unknown autoencoder preset {name!r}; choose one of {', '.join(AE_PRESETS)}") from None


class Autoencoder(torch.nn.Module):
    """A MONAI VAE or VQ-VAE that pads images to a multiple of its factor and crops decodes back.

    ``encode(x)``: (B, C, H, W) in [-1, 1] → unscaled latents (B, C_lat, ⌈H/f⌉, ⌈W/f⌉);
    ``decode(z, size)``: → (B, C, size, size); ``forward(x)`` → (x̂, regulariser terms) for training.
    """

    def __init__(self, d: AutoencoderDef, channels: int):
        super().__init__()
        from monai.networks.nets import VQVAE, AutoencoderKL

        self.d, self.factor = d, d.factor
        if d.kind == "vae":
            self.net = AutoencoderKL(
                spatial_dims=2, in_channels=channels, out_channels=channels, channels=d.channels,
                num_res_blocks=d.num_res_blocks, attention_levels=(False,) * len(d.channels),
                latent_channels=d.latent_channels, norm_num_groups=d.norm_num_groups,
                with_encoder_nonlocal_attn=d.attention, with_decoder_nonlocal_attn=d.attention)
        else:
            levels = len(d.channels)
            self.net = VQVAE(
                spatial_dims=2, in_channels=channels, out_channels=channels, channels=d.channels,
                num_res_channels=d.channels, num_res_layers=d.num_res_blocks,
                downsample_parameters=((2, 4, 1, 1),) * levels, upsample_parameters=((2, 4, 1, 1, 0),) * levels,
                num_embeddings=d.num_embeddings, embedding_dim=d.latent_channels, commitment_cost=d.commitment_cost)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = -x.shape[-2] % self.factor, -x.shape[-1] % self.factor
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x  # (B, C, H+ph, W+pw)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pad(x)
        if self.d.kind == "vae":
            mu, _ = self.net.encode(x)  # posterior mean: deterministic latents
            return mu
        return self.net.encode_stage_2_inputs(x)  # quantised embeddings

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """VQ-VAE: codebook indices (B, h, w) long."""
        return self.net.index_quantize(self._pad(x))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ-VAE: codebook indices (B, h, w) → embeddings (B, C_lat, h, w)."""
        return self.net.quantizer.embed(codes)

    def decode(self, z: torch.Tensor, size: int) -> torch.Tensor:
        out = self.net.decode(z) if self.d.kind == "vae" else self.net.decode_stage_2_outputs(z)
        return out[..., :size, :size]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h, w = x.shape[-2:]
        if self.d.kind == "vae":
            recon, mu, sigma = self.net(self._pad(x))
            terms = {"kl": kl_divergence(mu, sigma)}
        else:
            recon, q_loss = self.net(images=self._pad(x))
            terms = {"vq": q_loss}
        return recon[..., :h, :w], terms


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over latent dims, mean over the batch (Kingma & Welling 2014, App. B).

    mu, sigma: (B, C_lat, h, w) → scalar.
    """
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


def latent_shape(d: AutoencoderDef, image_size: int) -> tuple[int, int, int]:
    """(C_lat, h, w) of a square ``image_size`` image."""
    h = math.ceil(image_size / d.factor)
    return (d.latent_channels, h, h)


def build_autoencoder(d: AutoencoderDef, channels: int) -> Autoencoder:
    return Autoencoder(d.check(), channels)


def ae_def_from_card(card: dict[str, Any]) -> AutoencoderDef:
    return AutoencoderDef(**{k: tuple(v) if isinstance(v, list) else v for k, v in card["autoencoder"].items()})


@dataclass
class TrainedAutoencoder:
    """A finished autoencoder: network (eval, on device), its card, checkpoint sha256 and scale factor."""

    uri: str
    card: dict
    net: Autoencoder
    sha256: str
    scale_factor: float
    image_size: int
    channels: int
    latent: tuple[int, int, int] = field(default=(0, 0, 0))  # (C_lat, h, w)

    @torch.no_grad()
    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] → scaled latents (B, C_lat, h, w)."""
        return self.net.encode(x.to(next(self.net.parameters()).device)) * self.scale_factor

    @torch.no_grad()
    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C_lat, h, w) → images (B, C, H, W), clamped to [-1, 1]."""
        z = z.to(next(self.net.parameters()).device, torch.float32)
        return self.net.decode(z / self.scale_factor, self.image_size).clamp(-1, 1)


def load_autoencoder(uri: str, device: str | torch.device = "cpu", expected_sha256: str | None = None
                     ) -> TrainedAutoencoder:
    """A finished autoencoder run (``model.json`` of kind ``autoencoder``), checked against its card
    (and against ``expected_sha256``, the checksum a latent denoiser recorded)."""
    from meddiff.data.shards import read_card

    uri = storage.absolute(uri)
    card_uri = storage.join(uri, "model.json")
    if not storage.exists(card_uri):
        raise ArtifactError(f"{uri} is not a finished autoencoder (no model.json); train it with "
                            "'meddiff train-autoencoder' or pass the right URI")
    card = read_card(uri, "model.json")
    if card.get("kind") != "autoencoder":
        raise ArtifactError(f"{uri} is not an autoencoder (kind={card.get('kind')!r})")
    ckpt_uri = storage.join(uri, card["weights"])
    if not storage.exists(ckpt_uri):
        raise ArtifactError(f"autoencoder {uri} is incomplete: {card['weights']} is missing")
    path = Path(storage.fetch_local(ckpt_uri))
    digest = sha256_file(path)
    if digest != card["weights_sha256"]:
        raise ArtifactError(f"autoencoder weights {ckpt_uri} are corrupt: sha256 {digest[:12]}… does not match "
                            f"its card ({card['weights_sha256'][:12]}…)")
    if expected_sha256 is not None and digest != expected_sha256:
        raise ArtifactError(f"autoencoder {uri} has changed since the model was trained (sha256 {digest[:12]}… ≠ "
                            f"{expected_sha256[:12]}…); retrain the latent model or restore the autoencoder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = build_autoencoder(ae_def_from_card(card), int(card["channels"]))
        net.load_state_dict(state["autoencoder"])
    except Exception as e:  # noqa: BLE001 - a truncated/foreign file
        raise ArtifactError(f"autoencoder weights {ckpt_uri} are unreadable ({type(e).__name__}: {e})") from e
    net = net.to(device).eval().requires_grad_(False)
    return TrainedAutoencoder(uri, card, net, digest, float(card["scale_factor"]), int(card["image_size"]),
                              int(card["channels"]), tuple(card["latent_shape"]))
