"""``meddiff train``: train a conditional or per-class diffusion model; prints the model URI."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import typer

from meddiff.cli import app
from meddiff import storage
from meddiff.errors import MeddiffError
from meddiff.progress import rich_progress


def parse_channels(text: str | None) -> tuple[int, ...] | None:
    """"64,128,256" → (64, 128, 256); a clear error for anything else."""
    if text is None:
        return None
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise MeddiffError(f"--channels {text!r}: give comma-separated integers, e.g. 64,128,256") from None


@app.command()
def train(
    dataset_uri: str = typer.Argument(..., help="A dataset version URI (printed by 'meddiff ingest')."),
    mode: str = typer.Option("conditional", help="conditional | per-class"),
    preset: str = typer.Option("tiny", help="tiny | small | base"),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (per class for per-class); default: preset."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size; default: preset."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:<i>"),
    objective: str = typer.Option("ddpm", help="ddpm | rflow"),
    schedule: str = typer.Option("linear", help="DDPM beta schedule: linear | cosine | sigmoid"),
    prediction: str = typer.Option("v", help="DDPM target: v (trains far better here, README 'Train') | epsilon"),
    min_snr_gamma: Optional[float] = typer.Option(None, help="Min-SNR-γ loss weighting (DDPM), e.g. 5."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate; default: preset."),
    label_dropout: float = typer.Option(0.1, help="Conditional: label dropout for classifier-free guidance."),
    hflip: bool = typer.Option(False, help="Random horizontal flips (only if the domain allows)."),
    vflip: bool = typer.Option(False, help="Random vertical flips (only if the domain allows)."),
    seed: int = typer.Option(0, help="Random seed."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints; default: preset."),
    sample_every: Optional[int] = typer.Option(None, help="Steps between preview grids; default: preset."),
    log_every: Optional[int] = typer.Option(None, help="Steps between metrics rows; default: preset."),
    keep: int = typer.Option(2, help="Checkpoints kept per run."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network."),
    run_name: Optional[str] = typer.Option(None, help="Fixed run id instead of the content hash; only --steps may change, until it finishes."),
    cpu_threads: Optional[int] = typer.Option(None, help="CPU threads per process (default: the CPUs free right now, see meddiff.threads)."),
    preview_steps: int = typer.Option(25, help="Sampler steps of the preview grids."),
    num_workers: int = typer.Option(0, help="Data-loading worker processes per rank (capped at the shard count)."),
    channels: Optional[str] = typer.Option(None, help="U-Net channels per level, e.g. 64,128,256; default: preset."),
    attention_levels: Optional[str] = typer.Option(None, help="none | coarse | coarsest | all | 0/1 per level."),
    latent: Optional[str] = typer.Option(None, help="Autoencoder URI: train on its latents (latent diffusion)."),
    conditioning: str = typer.Option("embedding", help="Conditional: embedding | cross-attention"),
    storage_root: Optional[str] = typer.Option(None, "--storage", envvar=storage.ENV_VAR, help="Storage root."),
) -> None:
    """Train a diffusion model on a dataset version; prints the model URI (last line)."""
    from meddiff.threads import oversubscription
    from meddiff.train.distributed import env_rank
    from meddiff.train import TrainConfig, train as run_train  # torch/MONAI load only when used

    cfg = TrainConfig(dataset_uri, mode, preset, steps, batch_size, device, seed, resume, objective, schedule,
                      prediction, min_snr_gamma, lr=lr, label_dropout=label_dropout, hflip=hflip, vflip=vflip,
                      checkpoint_every=checkpoint_every, sample_every=sample_every, log_every=log_every,
                      keep=keep, compile=compile, run_name=run_name, cpu_threads=cpu_threads,
                      preview_steps=preview_steps, num_workers=num_workers,
                      network_channels=parse_channels(channels), attention_levels=attention_levels, latent=latent,
                      conditioning=conditioning).check()  # type: ignore[arg-type]
    main = env_rank() == 0
    if main and cpu_threads and (warning := oversubscription(cpu_threads)):
        typer.secho(f"warning: {warning}", fg="yellow", err=True)
    with (rich_progress(f"train {mode} {preset}") if main else nullcontext(None)) as progress:
        result = run_train(cfg, storage_root, progress)
    if main:
        if result.existed:
            typer.secho("model already trained; nothing to do", fg="yellow", err=True)
        print(result.uri)
