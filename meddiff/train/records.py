"""What a training run leaves beside its checkpoints: metrics.jsonl, loss curve, preview grids."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from meddiff import storage
from meddiff.models.diffusion import build_scheduler

METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / METRICS
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            break
    return rows


def truncate_metrics(run_dir: Path, max_step: int) -> None:
    """Drop rows after ``max_step`` (logged after the checkpoint a resume starts from)."""
    rows = [r for r in read_metrics(run_dir) if r["step"] <= max_step]
    storage.write_bytes(str(run_dir / METRICS), "".join(json.dumps(r) + "\n" for r in rows).encode())


def write_loss_curve(run_dir: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="loss", title=title)
    if rows and min(r["loss"] for r in rows) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(str(run_dir / LOSS_CURVE), buf.getvalue())


@torch.no_grad()
def preview_samples(net: torch.nn.Module, scheduler_config: dict[str, Any], labels: torch.Tensor | None, n: int,
                    channels: int, size: int, device: torch.device, seed: int, steps: int = 50,
                    latent: bool = False) -> torch.Tensor:
    """n preview images (n, C, H, W) in [0, 1] from the EMA net: DDIM (η=0) or rectified-flow Euler steps.
    ``latent``: raw latents (n, C_lat, h, w) instead, never clipped (scaled latents are not in [-1, 1]).

    labels: (n,) class ids for a conditional net (no guidance), None for an unconditional one.

    Uses its own generator, so it never disturbs the training RNG.
    """
    from monai.networks.schedulers import DDIMScheduler

    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, channels, size, size), generator=g).to(device)
    y = None if labels is None else labels.to(device)
    if scheduler_config["objective"] == "ddpm":
        sch = DDIMScheduler(num_train_timesteps=scheduler_config["num_train_timesteps"],
                            schedule=scheduler_config["schedule"], prediction_type=scheduler_config["prediction_type"],
                            clip_sample=not latent)
        sch.set_timesteps(steps, device=device)
        for t in sch.timesteps:
            out = net(x, timesteps=torch.full((n,), int(t), device=device), class_labels=y)
            x, _ = sch.step(out, int(t), x)
    else:
        sch = build_scheduler(scheduler_config)
        sch.set_timesteps(steps, device=device, input_img_size_numel=size * size)
        ts = list(sch.timesteps) + [torch.zeros_like(sch.timesteps[0])]
        for t, t_next in zip(ts[:-1], ts[1:]):
            out = net(x, timesteps=t.float().expand(n).to(device), class_labels=y)
            x, _ = sch.step(out, t, x, t_next)
    return x if latent else x.clamp(-1, 1).add(1).div(2)


def write_grid(images: torch.Tensor, path: Path) -> None:
    """(N, C, H, W) in [0, 1] → one PNG grid (atomic write)."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=int(len(images) ** 0.5 + 0.999), padding=2, pad_value=1.0)
    arr = grid.mul(255).round().byte().permute(1, 2, 0).numpy()  # (3, H, W) → (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    storage.write_bytes(str(path), buf.getvalue())
