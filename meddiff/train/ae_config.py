"""What an autoencoder run is: ``AETrainConfig`` and its checked plan (``AERunPlan``: run id, folder,
network definition, resolved training defaults). Run ids are content-addressed like denoiser runs:
``<dataset>-ae-<kind>-<preset>-<hash>`` under ``<root>/autoencoders/``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from meddiff import storage
from meddiff.data.shards import DatasetVersion, open_dataset
from meddiff.devices import check_device, resolve_device
from meddiff.errors import ArtifactError, MeddiffError, check_folder_name, check_seed
from meddiff.models.autoencoders import AEKind, AutoencoderDef, AutoencoderTrain, get_ae_preset
from meddiff.records import content_hash, to_jsonable
from typing import get_args


@dataclass(frozen=True)
class AETrainConfig:
    """Everything that defines an autoencoder run. ``None`` = the preset's default."""

    dataset_uri: str  # a dataset version (``meddiff ingest`` output)
    kind: AEKind = "vae"  # vae (AutoencoderKL + KL) or vqvae (VQVAE + commitment)
    preset: str = "tiny"  # network + defaults from meddiff.models.autoencoders.AE_PRESETS
    steps: int | None = None  # optimiser steps
    batch_size: int | None = None  # images per step
    lr: float | None = None  # autoencoder Adam learning rate
    kl_weight: float | None = None  # VAE: KL weight
    adv_weight: float | None = None  # adversarial weight (0 = no discriminator)
    adv_warmup_steps: int | None = None  # steps before the discriminator switches on
    perceptual_weights: str | None = None  # torchvision VGG16/AlexNet state dict for a perceptual loss (offline)
    perceptual_weight: float | None = None  # weight of the perceptual term
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>
    seed: int = 0  # seeds weights, data order and the val draw
    resume: bool = True  # continue from the newest checkpoint of the same run; False = start over
    val_batches: int = 2  # val-split batches of the val loss (fixed images: a smooth curve)
    checkpoint_every: int | None = None  # steps between checkpoints (plus one at the end)
    sample_every: int | None = None  # steps between reconstruction grids (plus one at the end)
    log_every: int | None = None  # steps between metrics rows (val loss too)
    keep: int = 2  # checkpoints kept
    run_name: str | None = None  # fixed run id instead of the content hash

    # fields that do not change the trained weights: left out of the run id
    OPERATIONAL = ("device", "resume", "checkpoint_every", "sample_every", "log_every", "keep", "run_name",
                   "val_batches")

    def check(self) -> "AETrainConfig":
        check_seed(self.seed)
        if self.kind not in get_args(AEKind):
            raise MeddiffError(f"--kind must be one of {', '.join(get_args(AEKind))}, not {self.kind!r}")
        get_ae_preset(self.preset)
        for name in ("steps", "batch_size", "checkpoint_every", "sample_every", "log_every", "keep", "val_batches"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise MeddiffError(f"{name} must be positive, not {v}")
        if self.lr is not None and not self.lr > 0:
            raise MeddiffError(f"--lr must be > 0, not {self.lr}")
        negative = [n for n in ("kl_weight", "adv_weight", "adv_warmup_steps", "perceptual_weight")
                    if getattr(self, n) is not None and getattr(self, n) < 0]
        if negative:
            raise MeddiffError(f"{', '.join(negative)} must be ≥ 0")
        if self.perceptual_weights is not None and not storage.exists(self.perceptual_weights):
            raise MeddiffError(f"--perceptual-weights {self.perceptual_weights} does not exist (weights are never "
                               "downloaded at run time; pass a local torchvision VGG16/AlexNet state dict)")
        check_device(self.device)
        if self.run_name is not None:
            check_folder_name(self.run_name, "--run-name", "autoencoders/<name>/")
        return self

    def resolved(self, train: AutoencoderTrain) -> "AETrainConfig":
        fill = {f: getattr(train, f) for f in ("steps", "batch_size", "lr", "kl_weight", "adv_weight",
                                               "adv_warmup_steps", "perceptual_weight", "checkpoint_every",
                                               "sample_every", "log_every") if getattr(self, f) is None}
        return dataclasses.replace(self, **fill)


@dataclass(frozen=True)
class AERunPlan:
    cfg: AETrainConfig  # resolved
    definition: AutoencoderDef
    train: AutoencoderTrain  # the preset's training defaults (discriminator shape, scale batches)
    dataset: DatasetVersion
    run_id: str
    uri: str  # <root>/autoencoders/<run-id>
    root: str
    perceptual_sha256: str | None = None  # the perceptual-loss weights file by content (None: no such file)

    def config_record(self) -> dict[str, Any]:
        return {**to_jsonable(self.cfg), "autoencoder": to_jsonable(self.definition),
                "train_defaults": to_jsonable(self.train)}

    def portable_record(self) -> dict[str, Any]:
        """The config as checkpoints keep it (``portable_config``): no operational settings, the dataset
        by version and the perceptual-loss weights by sha256, not by where they lie."""
        from meddiff.train.checkpoint import portable_config

        d = self.config_record()
        if self.perceptual_sha256:
            d["perceptual_weights"] = self.perceptual_sha256
        return portable_config(d, self.dataset.version, AETrainConfig.OPERATIONAL)


def plan_autoencoder(cfg: AETrainConfig, root: str | None = None) -> AERunPlan:
    """Check the request against the dataset and preset; name its run folder. Raises MeddiffError."""
    cfg = cfg.check()
    preset = get_ae_preset(cfg.preset)
    cfg = cfg.resolved(preset.train)
    resolve_device(cfg.device)
    ds = open_dataset(cfg.dataset_uri)
    for split in ("train", "val"):
        for shard in ds.shard_uris(split):
            if not storage.exists(shard):
                raise ArtifactError(f"{ds.uri} is incomplete: shard {shard} is missing; re-run the ingest")
    if ds.image_size not in preset.image_sizes:
        raise MeddiffError(f"autoencoder preset {cfg.preset!r} takes image sizes {list(preset.image_sizes)}, "
                           f"but {ds.uri} is {ds.image_size} px; re-ingest with --size")
    d = preset.definition(cfg.kind)
    weights_cfg = {k: v for k, v in to_jsonable(cfg).items() if k not in AETrainConfig.OPERATIONAL}
    weights_cfg["dataset_uri"] = None  # the dataset is identified by its version hash
    perceptual_sha256 = None
    if cfg.perceptual_weights:  # the file, not where it lies
        from meddiff.records import sha256_file
        perceptual_sha256 = weights_cfg["perceptual_weights"] = sha256_file(storage.fetch_local(cfg.perceptual_weights))
    digest = content_hash({"dataset": ds.version, "config": weights_cfg, "autoencoder": d})
    run_id = cfg.run_name or f"{ds.card.get('name', 'dataset')}-ae-{cfg.kind}-{cfg.preset}-{digest}"
    root = storage.storage_root(root)
    return AERunPlan(cfg, d, preset.train, ds, run_id, storage.join(root, "autoencoders", run_id), root,
                     perceptual_sha256)
