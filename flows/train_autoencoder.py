"""Prefect flow ``train-autoencoder``: the same parameters as ``meddiff train-autoencoder`` (meant for
a GPU work pool). One task run; a re-run finds the finished autoencoder or resumes the unfinished one."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import artifact_key, prefect_progress, retry_transient
from meddiff.progress import combine, rich_progress
from meddiff.train.ae_config import AETrainConfig
from meddiff.train.autoencoder import train_autoencoder as run_train


@task(name="train-autoencoder", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def train_autoencoder_task(cfg: AETrainConfig, storage_root: str | None) -> dict:
    what = f"train-autoencoder {cfg.kind} {cfg.preset}"
    with rich_progress(what) as terminal:
        result = run_train(cfg, storage_root, combine(prefect_progress(what), terminal))
    return result.card


def card_markdown(card: dict) -> str:
    return "\n".join([
        f"# Autoencoder `{card['run_id']}`", "", f"URI: `{card['uri']}`", "",
        f"- kind: {card['ae_kind']}, preset: {card['preset']}, dataset: `{card['dataset']['uri']}`",
        f"- latent shape: {tuple(card['latent_shape'])}, scale factor: {card['scale_factor']:.4g}, "
        f"compression: {card['compression_ratio']}×",
        f"- steps: {card['steps']}, parameters: {card['param_count']:,}, wall time: {card['wall_time_s']} s"])


@flow(name="train-autoencoder")
def train_autoencoder(
    dataset_uri: str,
    kind: str = "vae",
    preset: str = "tiny",
    steps: int | None = None,
    batch_size: int | None = None,
    adv_weight: float | None = None,
    adv_warmup_steps: int | None = None,
    perceptual_weights: str | None = None,
    resume: bool = True,
    device: str = "auto",
    seed: int = 0,
    storage_root: str | None = None,
) -> str:
    """Train (or resume, or find) a VAE / VQ-VAE for latent diffusion; returns its URI."""
    cfg = AETrainConfig(dataset_uri, kind, preset, steps, batch_size, adv_weight=adv_weight,  # type: ignore[arg-type]
                        adv_warmup_steps=adv_warmup_steps, perceptual_weights=perceptual_weights, device=device,
                        seed=seed, resume=resume).check()
    card = train_autoencoder_task(cfg, storage_root)
    get_run_logger().info("autoencoder %s", card["uri"])
    create_markdown_artifact(card_markdown(card), key=artifact_key("autoencoder", card["run_id"]),
                             description="autoencoder card")
    return card["uri"]
