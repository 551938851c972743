"""Named training presets: the ONE registry of network shapes and optimisation defaults.

A preset fixes the denoiser (MONAI ``DiffusionModelUNet``) and the defaults a run falls back to
when the user leaves a knob unset (steps, batch size, learning rate ...). ``tiny`` trains on a CPU
in CI within seconds; ``small`` and ``base`` are meant for a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from meddiff.errors import MeddiffError
from meddiff.models.networks import NetworkConfig


@dataclass(frozen=True)
class TrainPreset:
    """A network plus the defaults of every training knob the user may leave unset."""

    network: NetworkConfig
    steps: int  # optimiser steps per model (per class in per-class mode)
    batch_size: int  # global batch (split across DDP ranks)
    lr: float  # AdamW peak learning rate
    warmup_steps: int  # linear learning-rate warm-up from 0 to ``lr``
    ema_decay: float  # EMA decay of the weights used for sampling
    checkpoint_every: int  # steps between checkpoints (one is always written at the end)
    sample_every: int  # steps between preview sample grids (one is always written at the end)
    log_every: int  # steps between metrics.jsonl lines
    image_sizes: tuple[int, ...] = (28, 64, 96, 128)  # square image sizes the network is meant for
    channels: tuple[int, ...] = (1, 3)  # image channel counts the preset takes


PRESETS: dict[str, TrainPreset] = {
    # CPU/CI: two levels, one res block, attention only in the mid block; 0.17 M parameters (3-channel)
    "tiny": TrainPreset(NetworkConfig((16, 32), (False, False), 1, 8, 8), steps=200, batch_size=32, lr=2e-3,
                        warmup_steps=20, ema_decay=0.99, checkpoint_every=100, sample_every=1000, log_every=10),
    # one GPU, hours: three levels with attention on the two coarser ones; 16 M parameters
    "small": TrainPreset(NetworkConfig((64, 128, 256), (False, True, True), 2, 32, 32), steps=20_000,
                         batch_size=128, lr=2e-4, warmup_steps=500, ema_decay=0.999, checkpoint_every=2_000,
                         sample_every=5_000, log_every=50),
    # GPU, a day: four levels (28 px is padded to 32 inside the network); 74 M parameters
    "base": TrainPreset(NetworkConfig((128, 256, 256, 512), (False, False, True, True), 2, 64, 32),
                        steps=100_000, batch_size=128, lr=1e-4, warmup_steps=1_000, ema_decay=0.9999,
                        checkpoint_every=5_000, sample_every=10_000, log_every=100),
}


def get_preset(name: str) -> TrainPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise MeddiffError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
