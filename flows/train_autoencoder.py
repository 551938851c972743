"""Prefect flow ``train-autoencoder``: the same parameters as ``meddiff train-autoencoder`` (meant for
a GPU work pool). One task run; a re-run finds the finished autoencoder or resumes the unfinished one."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import (RESULT_OPTIONS, artifact_key, dataset_tag, explain_wait, one_traceback_per_failure, phrased,
                          prefect_progress, publish_link, required, retry_transient, tag_run, user_errors)
from meddiff import storage
from meddiff.models.autoencoders import AE_PRESETS, AEKind
from meddiff.progress import combine, rich_progress
from meddiff.train.ae_config import AETrainConfig
from meddiff.train.autoencoder import train_autoencoder as run_train

_D = AETrainConfig("")  # the library's defaults: the flow restates them (tests/test_flow_defaults.py)
AEPresetName = Literal[tuple(AE_PRESETS)]  # type: ignore[valid-type]  (the UI shows a choice list)


@task(name="train-autoencoder", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
@phrased
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


@flow(name="train-autoencoder", **RESULT_OPTIONS)
def train_autoencoder(
    dataset_uri: str,
    kind: AEKind = _D.kind,
    preset: AEPresetName = _D.preset,
    steps: int | None = _D.steps,
    batch_size: int | None = _D.batch_size,
    adv_weight: float | None = _D.adv_weight,
    adv_warmup_steps: int | None = _D.adv_warmup_steps,
    perceptual_weights: str | None = _D.perceptual_weights,
    resume: bool = _D.resume,
    device: str = _D.device,
    seed: int = _D.seed,
    storage_root: str | None = None,
    lr: float | None = _D.lr,
    kl_weight: float | None = _D.kl_weight,
    perceptual_weight: float | None = _D.perceptual_weight,
    checkpoint_every: int | None = _D.checkpoint_every,
    log_every: int | None = _D.log_every,
    run_name: str | None = _D.run_name,
) -> str:
    """Train (or resume, or find) a VAE / VQ-VAE for latent diffusion; returns its URI (train-model's ``latent``).

    Args:
        dataset_uri: An ingested dataset version (the ingest-dataset run's result), e.g. storage/datasets/bloodmnist/<version>.
        kind: vae (AutoencoderKL, KL-regularised float latents) or vqvae (VQ-VAE, codebook latents).
        preset: Network and training size: tiny (CPU/CI), small, base.
        steps: Optimiser steps; empty = the preset's default.
        batch_size: Images per step; empty = the preset's default.
        adv_weight: Weight of the patch discriminator's adversarial term (0 = no discriminator); empty = the preset's.
        adv_warmup_steps: Steps before the discriminator switches on; empty = the preset's default.
        perceptual_weights: A torchvision VGG16/AlexNet state dict the worker can read (never downloaded): adds a
            perceptual loss; empty = none.
        resume: Continue from the latest checkpoint of the same run; off = start over.
        device: auto (a GPU when the worker has one, else CPU), cpu, cuda or cuda:N.
        seed: Seeds weights, data order and the val draw.
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
        lr: Autoencoder learning rate; empty = the preset's.
        kl_weight: VAE: weight of the KL term; empty = the preset's.
        perceptual_weight: Weight of the perceptual term (with perceptual_weights); empty = the preset's.
        checkpoint_every: Steps between checkpoints; empty = the preset's.
        log_every: Steps between metrics rows (val loss too); empty = the preset's.
        run_name: A fixed run id instead of the content hash (only steps may change until it finishes).
    """
    one_traceback_per_failure()
    explain_wait()
    tag_run(dataset_tag(dataset_uri))
    with user_errors():
        required(dataset_uri, "dataset_uri", "ingest-dataset")
        cfg = AETrainConfig(dataset_uri, kind, preset, steps, batch_size, lr, kl_weight, adv_weight=adv_weight,
                            adv_warmup_steps=adv_warmup_steps, perceptual_weights=perceptual_weights,
                            perceptual_weight=perceptual_weight, device=device, seed=seed, resume=resume,
                            checkpoint_every=checkpoint_every, log_every=log_every, run_name=run_name).check()
    card = train_autoencoder_task(cfg, storage_root)
    get_run_logger().info("autoencoder %s", card["uri"])
    create_markdown_artifact(card_markdown(card), key=artifact_key("autoencoder", card["run_id"]),
                             description="autoencoder card")
    publish_link("autoencoder", card["uri"], card["run_id"], target=storage.join(card["uri"], "model.json"))
    return card["uri"]
