"""``meddiff train-autoencoder`` (VAE / VQ-VAE for latent diffusion) and ``meddiff encode`` (latent shards)."""

from __future__ import annotations

from typing import Optional

import typer

from meddiff import storage
from meddiff.cli import app
from meddiff.progress import rich_progress


@app.command("train-autoencoder")
def train_autoencoder(
    dataset_uri: str = typer.Argument(..., help="A dataset version URI (printed by 'meddiff ingest')."),
    kind: str = typer.Option("vae", help="vae (AutoencoderKL) | vqvae (VQVAE)"),
    preset: str = typer.Option("tiny", help="tiny | small | base"),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps; default: preset."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size; default: preset."),
    lr: Optional[float] = typer.Option(None, help="Autoencoder learning rate; default: preset."),
    kl_weight: Optional[float] = typer.Option(None, help="VAE: KL weight; default: preset."),
    adv_weight: Optional[float] = typer.Option(None, help="Adversarial weight (0 = no discriminator)."),
    adv_warmup_steps: Optional[int] = typer.Option(None, help="Steps before the discriminator switches on."),
    perceptual_weights: Optional[str] = typer.Option(
        None, help="Local torchvision AlexNet/VGG16 state dict: adds a perceptual loss (never downloaded)."),
    perceptual_weight: Optional[float] = typer.Option(None, help="Weight of the perceptual term."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:<i>"),
    seed: int = typer.Option(0, help="Random seed."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints; default: preset."),
    log_every: Optional[int] = typer.Option(None, help="Steps between metrics rows; default: preset."),
    run_name: Optional[str] = typer.Option(None, help="Fixed run id instead of the content hash; only --steps may change, until it finishes."),
    storage_root: Optional[str] = typer.Option(None, "--storage", envvar=storage.ENV_VAR, help="Storage root."),
) -> None:
    """Train an autoencoder for latent diffusion; prints its URI (last line)."""
    from meddiff.train.ae_config import AETrainConfig
    from meddiff.train.autoencoder import train_autoencoder as run

    cfg = AETrainConfig(dataset_uri, kind, preset, steps, batch_size, lr, kl_weight,  # type: ignore[arg-type]
                        adv_weight, adv_warmup_steps, perceptual_weights, perceptual_weight, device, seed, resume,
                        checkpoint_every=checkpoint_every, log_every=log_every, run_name=run_name).check()
    with rich_progress(f"train-autoencoder {kind} {preset}") as progress:
        result = run(cfg, storage_root, progress)
    if result.existed:
        typer.secho("autoencoder already trained; nothing to do", fg="yellow", err=True)
    card = result.card
    typer.echo(f"latent {tuple(card['latent_shape'])}, scale factor {card['scale_factor']:.4g}, "
               f"compression {card['compression_ratio']}×", err=True)
    print(result.uri)


@app.command()
def encode(
    dataset_uri: str = typer.Argument(..., help="A dataset version URI."),
    autoencoder_uri: str = typer.Argument(..., help="An autoencoder URI (printed by 'meddiff train-autoencoder')."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:<i>"),
    max_images: int = typer.Option(1000, help="Val images the reconstruction report is computed on (0 = all)."),
    perceptual_weights: Optional[str] = typer.Option(None, help="A local torchvision AlexNet/VGG16 state dict: "
                                                     "the report adds an LPIPS distance (unit layer weights)."),
    storage_root: Optional[str] = typer.Option(None, "--storage", envvar=storage.ENV_VAR, help="Storage root."),
) -> None:
    """Encode a dataset into latent shards (float16 or VQ codes) + reconstruction report; prints their URI."""
    from meddiff.evaluate.reconstruction import encode_with_report, summary_lines

    with rich_progress("encode") as progress:  # the report's steps told above the bar; it counts images encoded
        out = encode_with_report(dataset_uri, autoencoder_uri, device, max_images, storage_root,
                                 perceptual_weights=perceptual_weights, progress=progress)
    card = out["card"]
    typer.echo(f"{card['total_images']} images: {card['pixel_bytes_total']:,} → {card['latent_bytes_total']:,} bytes "
               f"(saved {card['bytes_saved']:,})", err=True)
    for line in summary_lines(card["reconstruction"]):  # the report the latents carry (latents.json)
        typer.echo(line, err=True)
    print(out["uri"])
