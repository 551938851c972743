"""The pictures beside a cohort: per-class sample grids and the reverse-diffusion strip and GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from meddiff import storage
from meddiff.data.images import decode_png
from meddiff.data.shards import iter_shard
from meddiff.generate.latent import trace_frames
from meddiff.generate.sampling import generate_images
from meddiff.generate.spec import CohortSpec
from meddiff.models.trained import TrainedModel
from meddiff.plots import image_grid, save_gif


def write_pictures(model: TrainedModel, spec: CohortSpec, guidance: float | None, device: torch.device,
                   manifest: pd.DataFrame, work: Path, per_class: int = 16, strip_samples: int = 4,
                   strip_frames: int = 8, shards_at: str | None = None) -> None:
    """grids/class-<i>.png (first images of each class) and reverse_diffusion.png/.gif, written into
    ``work``; shards are read from ``shards_at`` (a folder or URI) when given, else from ``work``."""
    wanted = {cid: set(g["key"].head(per_class)) for cid, g in manifest.groupby("class_id")}
    found: dict[int, list[np.ndarray]] = {cid: [] for cid in wanted}
    for shard in sorted(manifest["shard"].unique()):
        for s in iter_shard(f"{shards_at}/{shard}" if shards_at else str(work / shard)):
            cid = int(s["cls"])
            if s["__key__"] in wanted.get(cid, ()):
                found[cid].append(decode_png(s["png"]))
    (work / "grids").mkdir(exist_ok=True)
    for cid, imgs in found.items():
        if imgs:
            grid = f"class-{cid}.png" if cid >= 0 else "unconditional.png"
            storage.write_bytes(str(work / "grids" / grid), image_grid(np.stack(imgs)))
    # reverse diffusion: the first sample of a few classes, regenerated with their trajectory recorded
    firsts = manifest.groupby("class_id").head(1).head(strip_samples)
    frames: list[np.ndarray] = []  # each (B, C, H, W) uint8
    for _, row in firsts.iterrows():
        trace: list[torch.Tensor] = []
        generate_images(model, [int(row.class_id)], [int(row.seed)], spec.sampler, spec.steps, guidance, device, trace)
        picks = np.linspace(0, len(trace) - 1, strip_frames).round().astype(int)
        frames.append(trace_frames(model, trace, picks))  # (F, C, H, W); latent models: latent | decoded
    if frames:
        strip = np.stack(frames)  # (S, F, C, H, W): a row per sample, noise → image left to right
        s, f = strip.shape[:2]
        storage.write_bytes(str(work / "reverse_diffusion.png"), image_grid(strip.reshape(s * f, *strip.shape[2:]), cols=f))
        storage.write_bytes(str(work / "reverse_diffusion.gif"), save_gif(strip.transpose(1, 0, 2, 3, 4)))
