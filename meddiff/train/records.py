"""What a training run leaves beside its checkpoints: metrics.jsonl, loss curve, preview grids."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from meddiff import storage
from meddiff.figures import new_figure, to_png
from meddiff.models.diffusion import parameterization, sampling_grid
from meddiff.models.samplers import AUTO_SAMPLER, StackedNoise, predictor, run_sampler

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
    rows = read_metrics(run_dir)
    fig = new_figure(figsize=(6, 3.5), dpi=100)  # no pyplot: parallel parts draw from threads (meddiff.figures)
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:  # the EMA network on fixed val draws (meddiff.train.val_loss), at every checkpoint
        ax.plot(*zip(*val), "o-", ms=3, lw=1, label="val loss (EMA, fixed draws)")
        ax.legend(fontsize=8)
    ax.set(xlabel="step", ylabel="loss", title=title)
    if rows and min(min(r["loss"] for r in rows), min((v for _, v in val), default=1)) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    storage.write_bytes(str(run_dir / LOSS_CURVE), to_png(fig))


@torch.no_grad()
def preview_samples(net: torch.nn.Module, scheduler_config: dict[str, Any], labels: torch.Tensor | None, n: int,
                    channels: int, size: int, device: torch.device, seed: int, steps: int = 50,
                    latent: bool = False) -> torch.Tensor:
    """n preview images (n, C, H, W) in [0, 1] from the EMA net, with the objective's ``auto`` sampler
    of ``meddiff.models.samplers`` (the one generation uses; no guidance). ``latent``: raw latents
    (n, C_lat, h, w) instead, never clipped (scaled latents are not in [-1, 1]).

    labels: (n,) class ids for a conditional net, None for an unconditional one. Noise comes from its
    own per-image generators (seeds seed, seed + 1, ...), so it never disturbs the training RNG.
    """
    noise = StackedNoise([seed + i for i in range(n)])
    x = noise.randn((channels, size, size), device)  # (n, C, H, W)
    y = None if labels is None else labels.to(device)
    grid = sampling_grid(scheduler_config, steps)
    denoise = lambda x_t, t: net(x_t, timesteps=t, class_labels=y)  # noqa: E731
    objective = scheduler_config["objective"]
    predict = predictor(denoise, grid, parameterization(scheduler_config), clip=objective == "ddpm" and not latent)
    x = run_sampler(AUTO_SAMPLER[parameterization(scheduler_config)], predict, grid, x, noise)
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
