"""What a training run is: its config (``TrainConfig``), its resolved plan (``RunPlan``: run id,
folder, network, schedule) and its result. ``plan_run`` checks a request against the dataset.

Run ids are content-addressed: dataset name, mode, preset and a hash of the dataset version and
every setting that changes the weights, so identical requests share one folder and a re-run
resumes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from meddiff import storage
from meddiff.data.shards import DatasetVersion, open_dataset
from meddiff.devices import check_device, resolve_device
from meddiff.errors import ArtifactError, MeddiffError, check_folder_name, check_seed
from meddiff.models.diffusion import Objective, Prediction, Schedule, scheduler_config
from meddiff.models.networks import Conditioning, NetworkConfig
from meddiff.records import content_hash, to_jsonable
from meddiff.train.presets import get_preset

Mode = Literal["conditional", "per-class"]
PREVIEW_PER_CLASS = 8  # images per class in each preview grid


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. ``None`` = the preset's default."""

    dataset_uri: str  # a dataset version (``meddiff ingest`` output)
    mode: Mode = "conditional"  # one class-conditional model, or one unconditional model per class
    preset: str = "tiny"  # network + defaults from meddiff.train.presets.PRESETS
    steps: int | None = None  # optimiser steps (per class in per-class mode)
    batch_size: int | None = None  # global batch size (divided across DDP ranks)
    device: str = "auto"  # auto = cuda if available else cpu; or cpu | cuda | cuda:<i>
    seed: int = 0  # seeds weights, noise, timesteps, label dropout and data order
    resume: bool = True  # continue from the latest checkpoint of the same run; False = start over
    objective: Objective = "ddpm"  # ddpm (Ho et al. 2020) or rflow (rectified flow, Liu et al. 2022)
    schedule: Schedule = "linear"  # DDPM beta schedule: linear | cosine | sigmoid
    prediction: Prediction = "v"  # DDPM network target: v (FID 3 vs 47 for ε, same net and budget; README) | epsilon
    min_snr_gamma: float | None = None  # min-SNR-γ loss weighting (Hang et al. 2023, γ=5 typical); DDPM only
    num_train_timesteps: int = 1000  # T of the noise schedule
    lr: float | None = None  # AdamW peak learning rate
    warmup_steps: int | None = None  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float | None = None  # EMA decay of the sampling weights
    label_dropout: float = 0.1  # conditional: probability of replacing a label by the null class (CFG)
    hflip: bool = False  # random horizontal flips; only if the domain is left-right symmetric
    vflip: bool = False  # random vertical flips; only if the domain allows it
    checkpoint_every: int | None = None  # steps between checkpoints (plus one at the end)
    sample_every: int | None = None  # steps between preview grids (plus one at the end)
    log_every: int | None = None  # steps between metrics.jsonl rows
    keep: int = 2  # checkpoints kept per run folder (older ones are deleted)
    compile: bool = False  # torch.compile the network
    num_workers: int = 0  # DataLoader worker processes per rank for shard decoding (0 = in the training process)
    cpu_threads: int | None = None  # CPU intra-op threads per process; None = the CPUs free now (meddiff.threads; ÷ ranks under torchrun)
    preview_steps: int = 25  # sampler steps of the preview grids (DDIM or rectified-flow Euler)
    run_name: str | None = None  # fixed run id instead of the content hash; checked against the run's settings
    # network overrides of the preset (ablations); they enter the run id through the resolved network
    network_channels: tuple[int, ...] | None = None  # feature channels per U-Net level, e.g. (64, 128, 256); None = preset
    attention_levels: str | None = None  # none | coarse | coarsest | all | 0/1 per level ("0,1,1"); None = preset
    latent: str | None = None  # autoencoder URI: train on its latents (latent diffusion); None = pixels
    conditioning: Conditioning = "embedding"  # conditional mode: class embedding, or labels via cross-attention

    # fields that do not change the trained weights: left out of the run id
    OPERATIONAL = ("device", "resume", "checkpoint_every", "sample_every", "log_every", "keep", "compile",
                   "run_name", "cpu_threads", "preview_steps", "num_workers")

    def check(self) -> "TrainConfig":
        check_seed(self.seed)
        for name, allowed in (("mode", Mode), ("objective", Objective), ("schedule", Schedule),
                              ("prediction", Prediction), ("conditioning", Conditioning)):
            if getattr(self, name) not in get_args(allowed):
                raise MeddiffError(f"{name} must be one of {', '.join(get_args(allowed))}, not {getattr(self, name)!r}")
        get_preset(self.preset)
        for name in ("steps", "batch_size", "warmup_steps", "checkpoint_every", "sample_every", "log_every",
                     "num_train_timesteps", "keep", "cpu_threads", "preview_steps"):
            v = getattr(self, name)
            if v is not None and (v < (0 if name == "warmup_steps" else 1)):
                raise MeddiffError(f"{name} must be positive, not {v}")
        if self.num_workers < 0:
            raise MeddiffError(f"num_workers must be 0 or more, not {self.num_workers}")
        if self.lr is not None and not self.lr > 0:
            raise MeddiffError(f"--lr must be > 0, not {self.lr}")
        if not (self.weight_decay >= 0 and self.grad_clip > 0):
            raise MeddiffError(f"weight_decay must be ≥ 0 and grad_clip > 0, not {self.weight_decay} and {self.grad_clip}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise MeddiffError(f"ema_decay must be in [0, 1), not {self.ema_decay}")
        if not 0 <= self.label_dropout < 1:
            raise MeddiffError(f"label_dropout must be in [0, 1), not {self.label_dropout}")
        if self.min_snr_gamma is not None and (self.objective != "ddpm" or self.min_snr_gamma <= 0):
            raise MeddiffError(f"min_snr_gamma must be > 0 and applies to the ddpm objective only, not "
                               f"{self.min_snr_gamma} with {self.objective}")
        if self.conditioning != "embedding" and self.mode != "conditional":
            raise MeddiffError("--conditioning applies to conditional models; per-class models are unconditional")
        check_device(self.device)
        if self.run_name is not None:
            check_folder_name(self.run_name, "--run-name", "models/<name>/")
        self.network(get_preset(self.preset).network)
        return self

    def network(self, base: NetworkConfig) -> NetworkConfig:
        """The preset's network with this run's ``network_channels``/``attention_levels`` applied."""
        channels = tuple(int(c) for c in self.network_channels) if self.network_channels else base.channels
        if self.attention_levels is None:
            if len(channels) != len(base.attention_levels):
                raise MeddiffError(f"--channels has {len(channels)} levels, the preset {len(base.attention_levels)}: "
                                   "give --attention-levels too")
            attention = base.attention_levels
        else:
            attention = attention_flags(self.attention_levels, len(channels))
        return dataclasses.replace(base, channels=channels, attention_levels=attention).check()

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in from the preset."""
        p = get_preset(self.preset)
        fill = {f: getattr(p, f) for f in ("steps", "batch_size", "lr", "warmup_steps", "ema_decay",
                                           "checkpoint_every", "sample_every", "log_every")
                if getattr(self, f) is None}
        return dataclasses.replace(self, **fill)


def attention_flags(spec: str, levels: int) -> tuple[bool, ...]:
    """Self-attention per U-Net level from a word or a 0/1 list (finest level first).

    none: no level (MONAI's middle block keeps its attention); coarse: every level but the finest;
    coarsest: the last level only; all: every level; "0,1,1": explicit flags.
    """
    words = {"none": [False] * levels, "all": [True] * levels,
             "coarse": [False] + [True] * (levels - 1), "coarsest": [False] * (levels - 1) + [True]}
    if spec in words:
        return tuple(words[spec])
    flags = [f.strip() for f in spec.split(",")]
    if len(flags) != levels or any(f not in ("0", "1") for f in flags):
        raise MeddiffError(f"attention levels {spec!r}: give none|coarse|coarsest|all or {levels} comma-separated "
                           "0/1 flags (one per channel level)")
    return tuple(f == "1" for f in flags)


@dataclass(frozen=True)
class TrainResult:
    uri: str  # the model URI (load with meddiff.models.load_model)
    card: dict  # its model.json
    existed: bool  # a complete model was found; no training was done


@dataclass(frozen=True)
class RunPlan:
    """A resolved, checked request: where the run lives and what it trains on."""

    cfg: TrainConfig  # resolved (no None defaults left)
    network: NetworkConfig
    dataset: DatasetVersion
    run_id: str
    uri: str  # <root>/models/<run-id>
    root: str
    scheduler_config: dict[str, Any]
    autoencoder: dict[str, Any] | None = None  # latent diffusion: uri, sha256, scale_factor, latent_shape, kind

    @property
    def net_channels(self) -> int:
        """Channels the denoiser sees: the latent's or the image's."""
        return self.autoencoder["latent_shape"][0] if self.autoencoder else self.dataset.channels

    @property
    def net_size(self) -> int:
        """Side the denoiser sees: the latent's or the image's."""
        return self.autoencoder["latent_shape"][1] if self.autoencoder else self.dataset.image_size

    @property
    def parts(self) -> list[int | None]:
        """None for the conditional model; the class ids for per-class parts."""
        return [None] if self.cfg.mode == "conditional" else list(range(self.dataset.num_classes))

    def part_uri(self, class_id: int | None) -> str:
        return self.uri if class_id is None else storage.join(self.uri, f"class-{class_id}")

    def config_record(self) -> dict[str, Any]:
        d = {k: v for k, v in to_jsonable(self.cfg).items()}
        d["network"] = to_jsonable(self.network)
        d["scheduler_config"] = self.scheduler_config
        return d

    def portable_record(self) -> dict[str, Any]:
        """The config as checkpoints keep it (``portable_config``): no operational settings, the dataset
        by version and the autoencoder by sha256, not by where they lie."""
        from meddiff.train.checkpoint import portable_config

        d = self.config_record()
        if self.autoencoder:
            d["latent"] = self.autoencoder["sha256"]
        return portable_config(d, self.dataset.version, TrainConfig.OPERATIONAL)


def plan_run(cfg: TrainConfig, root: str | None = None) -> RunPlan:
    """Check the request against the dataset and preset; name its run folder. Raises MeddiffError."""
    cfg = cfg.check().resolved()
    resolve_device(cfg.device)  # fails now, not after the data checks, when no GPU is there
    ds = open_dataset(cfg.dataset_uri)
    for shard in ds.shard_uris("train"):
        if not storage.exists(shard):
            raise ArtifactError(f"{ds.uri} is incomplete: shard {shard} is missing; re-run the ingest")
    preset = get_preset(cfg.preset)
    autoencoder = None
    if cfg.latent is not None:
        from meddiff.train.latent import autoencoder_ref

        autoencoder = autoencoder_ref(cfg.latent, ds)
    elif ds.image_size not in preset.image_sizes:
        raise MeddiffError(f"preset {cfg.preset!r} takes image sizes {list(preset.image_sizes)}, "
                           f"but {ds.uri} is {ds.image_size} px; re-ingest with --size")
    if ds.channels not in preset.channels:
        raise MeddiffError(f"preset {cfg.preset!r} takes {list(preset.channels)}-channel images, "
                           f"but {ds.uri} has {ds.channels} channels")
    counts = ds.card.get("counts", {}).get("train", {})
    empty = [c for c in ds.class_names if counts.get(c, 1) == 0]
    if empty and cfg.mode == "per-class":
        raise MeddiffError(f"per-class training needs training images of every class; none for {empty}")
    network = cfg.network(preset.network)
    sched = scheduler_config(cfg.objective, cfg.schedule, cfg.prediction, cfg.num_train_timesteps,
                             autoencoder["latent_shape"][1] if autoencoder else ds.image_size)
    weights_cfg = {k: v for k, v in to_jsonable(cfg).items()
                   if k not in TrainConfig.OPERATIONAL + ("network_channels", "attention_levels")}  # → network
    weights_cfg["dataset_uri"] = None  # the dataset is identified by its version hash instead
    if cfg.latent is None:  # pixel runs keep the ids they had before latent diffusion
        del weights_cfg["latent"]
    else:  # the autoencoder is identified by its weights
        weights_cfg["latent"] = autoencoder["sha256"]
    if cfg.conditioning == "embedding":
        del weights_cfg["conditioning"]
    digest = content_hash({"dataset": ds.version, "config": weights_cfg, "network": network})
    kind = f"latent-{autoencoder['kind']}-" if autoencoder else ""
    run_id = cfg.run_name or f"{ds.card.get('name', 'dataset')}-{kind}{cfg.mode}-{cfg.preset}-{digest}"
    root = storage.storage_root(root)
    return RunPlan(cfg, network, ds, run_id, storage.join(root, "models", run_id), root, sched, autoencoder)
