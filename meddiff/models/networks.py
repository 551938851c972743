"""The denoiser: MONAI's 2-D ``DiffusionModelUNet``, padded so any image size fits its levels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

from meddiff.errors import MeddiffError

Conditioning = Literal["embedding", "cross-attention"]  # class embedding added to the time embedding, or
# a learned label embedding read through cross-attention (MONAI ``with_conditioning``; the ADNI design)


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of the 2-D ``DiffusionModelUNet``; one entry per resolution level where a tuple."""

    channels: tuple[int, ...] = (16, 32)  # feature channels per level (the ``dim_mults`` of other codebases)
    attention_levels: tuple[bool, ...] = (False, False)  # self-attention on/off per level (attention ablation)
    num_res_blocks: int = 1  # residual blocks per level
    num_head_channels: int = 8  # channels per attention head (where attention is on)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every entry of ``channels``
    resblock_updown: bool = False  # down/up-sample with residual blocks instead of strided convs
    use_flash_attention: bool = True  # attention through torch's scaled_dot_product_attention (faster, less memory)

    def check(self) -> "NetworkConfig":
        if len(self.channels) != len(self.attention_levels):
            raise MeddiffError(f"network: {len(self.channels)} channel levels but "
                               f"{len(self.attention_levels)} attention flags")
        bad = [c for c in self.channels if c <= 0 or c % self.norm_num_groups]
        if bad:
            raise MeddiffError(f"network: channels {bad} are not positive multiples of "
                               f"norm_num_groups={self.norm_num_groups}")
        return self



class PaddedUNet(torch.nn.Module):
    """``DiffusionModelUNet`` that zero-pads H, W up to a multiple of 2^(levels-1) and crops back.

    A U-Net with L levels halves the image L-1 times; 28 px works with up to 3 levels
    (28→14→7) and is padded to 32 for 4. Call: ``net(x, timesteps=t, class_labels=y)`` with
    x: (B, C, H, W), t: (B,), y: (B,) long or None; returns (B, C, H, W).
    """

    def __init__(self, unet: DiffusionModelUNet, levels: int, label_embed: torch.nn.Embedding | None = None):
        super().__init__()
        self.unet = unet
        self.multiple = 2 ** (levels - 1)
        self.label_embed = label_embed  # cross-attention conditioning: labels → (B, 1, D) context

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None):
        h, w = x.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))  # (B, C, H, W) → (B, C, H+ph, W+pw)
        if self.label_embed is not None:
            context = self.label_embed(class_labels)[:, None]  # (B,) → (B, 1, D)
            out = self.unet(x, timesteps=timesteps, context=context)
        else:
            out = self.unet(x, timesteps=timesteps, class_labels=class_labels)
        return out[..., :h, :w] if (ph or pw) else out


def build_network(net: NetworkConfig, channels: int, num_class_embeds: int | None,
                  conditioning: Conditioning = "embedding") -> PaddedUNet:
    """A fresh denoiser for ``channels``-channel images (or latents); ``num_class_embeds`` = classes + 1
    (null) or None. ``cross-attention``: the labels enter as a (B, 1, D) context, D = the widest level."""
    cross = conditioning == "cross-attention" and num_class_embeds is not None
    dim = max(net.channels)
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=channels, out_channels=channels,
        num_res_blocks=net.num_res_blocks, channels=net.channels, attention_levels=net.attention_levels,
        norm_num_groups=net.norm_num_groups, num_head_channels=net.num_head_channels,
        resblock_updown=net.resblock_updown, num_class_embeds=None if cross else num_class_embeds,
        use_flash_attention=net.use_flash_attention,
        **({"with_conditioning": True, "cross_attention_dim": dim} if cross else {}),
    )
    return PaddedUNet(unet, len(net.channels), torch.nn.Embedding(num_class_embeds, dim) if cross else None)


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
