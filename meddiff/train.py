"""Train diffusion models on a dataset version: one class-conditional model or one model per class.

Library entry point: ``train(TrainConfig(...), root) -> TrainResult``. Multi-process:
``torchrun --nproc_per_node N -m meddiff.train DATASET_URI [options of 'meddiff train']``.

Layout (content-addressed run id = dataset name, mode, preset and a hash of the dataset version
and the resolved config, so identical requests share one folder and a re-run resumes it)::

    <root>/models/<run-id>/                 conditional: one run folder
        config.json  metrics.jsonl  loss_curve.png  samples/step-XXXXXXX/class-<i>.png
        checkpoints/step-XXXXXXX.pt  model.json   (model.json last = complete)
    <root>/models/<run-id>/                 per-class: a group
        class-<i>/ (one run folder each, as above)  model.json (group card, last)
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from . import storage
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .diffusion import Objective, Prediction, Schedule, build_scheduler, scheduler_config
from .distributed import DistInfo, barrier, ensure_process_group, mean_across
from .errors import ArtifactError, MeddiffError
from .networks import param_count
from .progress import Progress
from .records import content_hash, make_record, sha256_bytes, sha256_file, to_jsonable
from .shards import DatasetVersion, open_dataset
from .train_data import DataSpec, batches
from .run_folder import RunFolder
from .train_presets import NetworkConfig, get_preset
from .train_step import build_training_state, drop_labels, train_step
from .train_records import (append_metrics, preview_samples, read_metrics, truncate_metrics, write_grid,
                            write_loss_curve)

Mode = Literal["conditional", "per-class"]
PREVIEW_PER_CLASS = 8  # images per class in each preview grid


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. ``None`` = the preset's default."""

    dataset_uri: str  # a dataset version (``meddiff ingest`` output)
    mode: Mode = "conditional"  # one class-conditional model, or one unconditional model per class
    preset: str = "tiny"  # network + defaults from meddiff.train_presets.PRESETS
    steps: int | None = None  # optimiser steps (per class in per-class mode)
    batch_size: int | None = None  # global batch size (divided across DDP ranks)
    device: str = "auto"  # auto = cuda if available else cpu; or cpu | cuda | cuda:<i>
    seed: int = 0  # seeds weights, noise, timesteps, label dropout and data order
    resume: bool = True  # continue from the latest checkpoint of the same run; False = start over
    objective: Objective = "ddpm"  # ddpm (Ho et al. 2020) or rflow (rectified flow, Liu et al. 2022)
    schedule: Schedule = "linear"  # DDPM beta schedule: linear | cosine | sigmoid
    prediction: Prediction = "epsilon"  # DDPM network target: epsilon | v
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
    cpu_threads: int | None = None  # CPU intra-op threads per process; None = torch's default (÷ ranks under torchrun)
    preview_steps: int = 25  # sampler steps of the preview grids (DDIM or rectified-flow Euler)
    run_name: str | None = None  # fixed run id instead of the content hash (e.g. to extend a run's steps)

    # fields that do not change the trained weights: left out of the run id
    OPERATIONAL = ("device", "resume", "checkpoint_every", "sample_every", "log_every", "keep", "compile",
                   "run_name", "cpu_threads", "preview_steps", "num_workers")

    def check(self) -> "TrainConfig":
        for name, allowed in (("mode", Mode), ("objective", Objective), ("schedule", Schedule),
                              ("prediction", Prediction)):
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
        if not 0 <= self.label_dropout < 1:
            raise MeddiffError(f"label_dropout must be in [0, 1), not {self.label_dropout}")
        if self.min_snr_gamma is not None and (self.objective != "ddpm" or self.min_snr_gamma <= 0):
            raise MeddiffError("min_snr_gamma applies to the ddpm objective only and must be > 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise MeddiffError(f"device must be auto, cpu, cuda or cuda:<i>, not {self.device!r}")
        return self

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in from the preset."""
        p = get_preset(self.preset)
        fill = {f: getattr(p, f) for f in ("steps", "batch_size", "lr", "warmup_steps", "ema_decay",
                                           "checkpoint_every", "sample_every", "log_every")
                if getattr(self, f) is None}
        return dataclasses.replace(self, **fill)


@dataclass(frozen=True)
class TrainResult:
    uri: str  # the model URI (load with meddiff.checkpoint.load_model)
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


def resolve_device(requested: str, info: DistInfo | None = None) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MeddiffError("CUDA was requested but is not available on this machine; use --device cpu")
        if requested == "cuda" and info is not None and info.world > 1:
            return torch.device(f"cuda:{info.local_rank}")
    return torch.device(requested)


def plan_run(cfg: TrainConfig, root: str | None = None) -> RunPlan:
    """Check the request against the dataset and preset; name its run folder. Raises MeddiffError."""
    cfg = cfg.check().resolved()
    resolve_device(cfg.device)
    ds = open_dataset(cfg.dataset_uri)
    for shard in ds.shard_uris("train"):
        if not storage.exists(shard):
            raise ArtifactError(f"{ds.uri} is incomplete: shard {shard} is missing; re-run the ingest")
    preset = get_preset(cfg.preset)
    if ds.image_size not in preset.image_sizes:
        raise MeddiffError(f"preset {cfg.preset!r} takes image sizes {list(preset.image_sizes)}, "
                           f"but {ds.uri} is {ds.image_size} px; re-ingest with --size")
    if ds.channels not in preset.channels:
        raise MeddiffError(f"preset {cfg.preset!r} takes {list(preset.channels)}-channel images, "
                           f"but {ds.uri} has {ds.channels} channels")
    counts = ds.card.get("counts", {}).get("train", {})
    empty = [c for c in ds.class_names if counts.get(c, 1) == 0]
    if empty and cfg.mode == "per-class":
        raise MeddiffError(f"per-class training needs training images of every class; none for {empty}")
    network = preset.network.check()
    sched = scheduler_config(cfg.objective, cfg.schedule, cfg.prediction, cfg.num_train_timesteps, ds.image_size)
    weights_cfg = {k: v for k, v in to_jsonable(cfg).items() if k not in TrainConfig.OPERATIONAL}
    weights_cfg["dataset_uri"] = None  # the dataset is identified by its version hash instead
    digest = content_hash({"dataset": ds.version, "config": weights_cfg, "network": network})
    run_id = cfg.run_name or f"{ds.card.get('name', 'dataset')}-{cfg.mode}-{cfg.preset}-{digest}"
    root = storage.storage_root(root)
    return RunPlan(cfg, network, ds, run_id, storage.join(root, "models", run_id), root, sched)


# --------------------------------------------------------------------------- training one network

def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])  # (a different GPU count keeps fresh CUDA streams)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (peak RSS)


def _check_compatible(state: dict[str, Any], part: dict[str, Any], path: Path) -> None:
    """A checkpoint being resumed must come from the same classes and the same network."""
    if state.get("num_classes") != part["num_classes"]:
        raise MeddiffError(f"checkpoint {path} was trained on {state.get('num_classes')} classes but the dataset "
                           f"has {part['num_classes']}; use another run name or --no-resume")
    for key in ("network", "channels", "image_size", "class_id", "num_class_embeds", "scheduler_config"):
        if to_jsonable(state.get(key)) != to_jsonable(part[key]):
            raise MeddiffError(f"checkpoint {path} has a different {key} ({state.get(key)} ≠ {part[key]}); "
                               f"use another run name or --no-resume")


def _part_identity(plan: RunPlan, class_id: int | None) -> dict[str, Any]:
    """What a part's network is: stored in its checkpoints and its card (load_model rebuilds from it)."""
    ds = plan.dataset
    return {"class_id": class_id, "num_classes": ds.num_classes, "channels": ds.channels,
            "image_size": ds.image_size, "network": to_jsonable(plan.network),
            "num_class_embeds": ds.num_classes + 1 if class_id is None else None,
            "scheduler_config": plan.scheduler_config}


def train_part(plan: RunPlan, class_id: int | None, progress: Progress | None = None,
               progress_offset: int = 0, progress_total: int | None = None) -> dict[str, Any]:
    """Train (or resume, or find finished) one network; returns its card. Only rank 0 writes."""
    cfg, ds = plan.cfg, plan.dataset
    folder = RunFolder.for_uri(plan.part_uri(class_id))
    card_uri = storage.join(folder.uri, "model.json")
    if storage.exists(card_uri):
        return storage.read_json(card_uri)
    info = ensure_process_group(resolve_device(cfg.device).type)
    device = resolve_device(cfg.device, info)
    if cfg.batch_size % info.world:
        raise MeddiffError(f"batch size {cfg.batch_size} is not divisible by the {info.world} processes")
    identity = _part_identity(plan, class_id)
    started = time.time()
    if device.type == "cpu" and (cfg.cpu_threads or info.world > 1):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world))
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // local_world))

    if info.is_main:
        _prepare_folder(plan, folder, identity)
    barrier(info)

    torch.manual_seed(cfg.seed * 1000 + (class_id or 0) * 7 + 1)  # same initial weights on every rank
    st = build_training_state(plan.network, ds.channels, identity["num_class_embeds"], device, cfg.lr,
                              cfg.weight_decay, cfg.warmup_steps, cfg.ema_decay)
    scheduler = build_scheduler(plan.scheduler_config)

    step, wall_before = 0, 0.0
    ckpts = list_checkpoints(folder.local) if cfg.resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1], map_location=device)
        _check_compatible(state, identity, ckpts[-1])
        st.load_state_dict(state)
        step, wall_before = int(state["step"]), float(state.get("wall_time_s", 0.0))
        if info.is_main:
            _set_rng_state(state["rng"])  # rank 0 continues its exact random stream
            truncate_metrics(folder.local, step)
    if not (ckpts and info.is_main):
        torch.manual_seed(cfg.seed * 1000 + (class_id or 0) * 7 + 2 + 7919 * info.rank + step)
    barrier(info)

    model: torch.nn.Module = st.net
    if info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(st.net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    spec = DataSpec(class_id=class_id, hflip=cfg.hflip, vflip=cfg.vflip, num_workers=cfg.num_workers)
    data = batches(ds, spec, cfg.batch_size // info.world, cfg.seed, step, info.rank, info.world)
    total = cfg.steps
    total_progress = progress_total or total
    null_class = ds.num_classes
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_sum, n_sum, t_last, step_last = torch.zeros((), device=device), 0, time.perf_counter(), step
    last_saved = step if ckpts else -1

    def save(at: int) -> Path | None:
        nonlocal last_saved
        last_saved = at
        path = None
        if info.is_main:
            path = save_checkpoint(folder.local, at, {
                **st.state_dict(), "rng": _rng_state(), "config": plan.config_record(),
                "wall_time_s": wall_before + time.time() - started, **identity}, keep=cfg.keep)
            write_loss_curve(folder.local, plan.run_id if class_id is None else f"{plan.run_id} class {class_id}")
            folder.push(["metrics.jsonl", "config.json", "loss_curve.png", f"checkpoints/{path.name}"])
        barrier(info)
        return path

    st.net.train()
    while step < total:
        x, y = next(data)
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        labels = None
        if class_id is None:  # conditional: labels, some replaced by the null class
            labels = drop_labels(y.to(device), cfg.label_dropout, null_class)
        loss = train_step(model, st, scheduler, x, labels, cfg.prediction, cfg.min_snr_gamma, cfg.grad_clip,
                          autocast)
        step += 1
        loss_sum += loss
        n_sum += 1

        is_ckpt = step % cfg.checkpoint_every == 0 or step == total
        if step % cfg.log_every == 0 or is_ckpt:
            mean_loss = float(mean_across(loss_sum / n_sum, info))
            if not math.isfinite(mean_loss):
                raise MeddiffError(f"the loss became {mean_loss} by step {step}; lower --lr or use another "
                                   f"schedule; the last good checkpoint is kept (step {max(last_saved, 0)})")
            now = time.perf_counter()
            if info.is_main:
                append_metrics(folder.local, {
                    "step": step, "loss": mean_loss, "lr": st.lr_sched.get_last_lr()[0],
                    "images_per_s": (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9),
                    "peak_mem_mb": round(_peak_memory_mb(device), 1), "class_id": class_id})
            loss_sum.zero_()
            n_sum, t_last, step_last = 0, now, step
        if info.is_main and (step % cfg.sample_every == 0 or step == total):
            _write_previews(plan, folder, st.ema.module, class_id, step, device)
        if is_ckpt:
            save(step)
        if progress is not None and info.is_main:
            progress(progress_offset + step, total_progress)

    card: dict[str, Any] = {}
    if info.is_main:
        card = _finish_part(plan, class_id, identity, folder, st.ema.module, device, info,
                            wall_before + time.time() - started)
    barrier(info)
    return card


def _prepare_folder(plan: RunPlan, folder: RunFolder, identity: dict[str, Any]) -> None:
    """Rank 0: create (or, without resume, clear) the run folder; fetch remote state; write config.json."""
    folder.local.mkdir(parents=True, exist_ok=True)
    if not plan.cfg.resume:
        shutil.rmtree(folder.local / "checkpoints", ignore_errors=True)
        (folder.local / "metrics.jsonl").unlink(missing_ok=True)
    elif folder.remote:
        folder.pull_latest()
    config_rec = make_record("train-config", plan.config_record(), {"dataset": plan.dataset.uri}, part=identity,
                             run_id=plan.run_id)
    storage.write_json(str(folder.local / "config.json"), config_rec)


def _finish_part(plan: RunPlan, class_id: int | None, identity: dict[str, Any], folder: RunFolder,
                 ema_net: torch.nn.Module, device: torch.device, info: DistInfo, wall_time_s: float) -> dict:
    """Rank 0: loss curve, then the card (model.json) last; remote roots get the files, the card last."""
    ckpt = list_checkpoints(folder.local)[-1]
    if int(ckpt.name[5:12]) != plan.cfg.steps:  # e.g. a named run resumed with fewer steps than it has
        raise ArtifactError(f"{folder.local} has no checkpoint for the final step {plan.cfg.steps}")
    write_loss_curve(folder.local, plan.run_id if class_id is None else f"{plan.run_id} class {class_id}")
    card = _part_card(plan, class_id, identity, folder, ckpt, ema_net, read_metrics(folder.local), device, info,
                      wall_time_s)
    storage.write_json(str(folder.local / "model.json"), card)
    samples = [p.relative_to(folder.local).as_posix() for p in sorted((folder.local / "samples").rglob("*.png"))]
    folder.push(["config.json", "metrics.jsonl", "loss_curve.png", f"checkpoints/{ckpt.name}", *samples,
                 "model.json"])
    return card


def _write_previews(plan: RunPlan, folder: RunFolder, ema_net: torch.nn.Module, class_id: int | None,
                    step: int, device: torch.device) -> None:
    ds, n = plan.dataset, PREVIEW_PER_CLASS
    classes = [class_id] if class_id is not None else list(range(ds.num_classes))
    labels = None if class_id is not None else torch.arange(ds.num_classes).repeat_interleave(n)  # (K·n,)
    ema_net.eval()
    imgs = preview_samples(ema_net, plan.scheduler_config, labels, n * len(classes), ds.channels, ds.image_size,
                           device, seed=plan.cfg.seed, steps=plan.cfg.preview_steps)
    for i, cid in enumerate(classes):
        write_grid(imgs[i * n:(i + 1) * n], folder.local / "samples" / f"step-{step:07d}" / f"class-{cid}.png")
    ema_net.train()


def _part_card(plan: RunPlan, class_id: int | None, identity: dict[str, Any], folder: RunFolder, ckpt: Path,
               ema_net: torch.nn.Module, rows: list[dict], device: torch.device, info: DistInfo,
               wall_time_s: float) -> dict[str, Any]:
    ds, cfg = plan.dataset, plan.cfg
    dataset_card_sha = sha256_bytes(storage.read_bytes(storage.join(ds.uri, "dataset.json")))
    return make_record(
        "model" if class_id is None else "model-part", plan.config_record(),
        {"dataset": {"uri": ds.uri, "version": ds.version, "card_sha256": dataset_card_sha}},
        uri=folder.uri, run_id=plan.run_id, mode=cfg.mode, preset=cfg.preset, objective=cfg.objective,
        dataset={"uri": ds.uri, "name": ds.card.get("name"), "version": ds.version},
        class_names=ds.class_names, null_class=ds.num_classes if class_id is None else None, **identity,
        param_count=param_count(ema_net), steps=cfg.steps, final_loss=rows[-1]["loss"] if rows else None,
        wall_time_s=round(wall_time_s, 2), device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        world_size=info.world, checkpoint=f"checkpoints/{ckpt.name}", checkpoint_sha256=sha256_file(ckpt),
        samples=f"samples/step-{cfg.steps:07d}",
    )


def _group_card(plan: RunPlan, parts: dict[int, dict[str, Any]]) -> dict[str, Any]:
    ds, cfg = plan.dataset, plan.cfg
    first = parts[0]
    return make_record(
        "model", plan.config_record(), first["inputs"], uri=plan.uri, run_id=plan.run_id, mode=cfg.mode,
        preset=cfg.preset, objective=cfg.objective, dataset=first["dataset"], class_names=ds.class_names,
        null_class=None, num_classes=ds.num_classes, channels=ds.channels, image_size=ds.image_size,
        network=to_jsonable(plan.network), scheduler_config=plan.scheduler_config,
        parts={str(c): f"class-{c}" for c in parts},
        checkpoint_sha256={ds.class_names[c]: p["checkpoint_sha256"] for c, p in parts.items()},
        param_count=sum(p["param_count"] for p in parts.values()), steps=cfg.steps,
        wall_time_s=round(sum(p["wall_time_s"] for p in parts.values()), 2), device=first["device"],
        device_name=first["device_name"], world_size=first["world_size"],
    )


def finish_group(plan: RunPlan) -> dict[str, Any]:
    """Per-class: write the group model.json once every class part is complete."""
    parts = {}
    for c in plan.parts:
        uri = storage.join(plan.part_uri(c), "model.json")
        if not storage.exists(uri):
            raise ArtifactError(f"{plan.uri}: class {c} has not finished training")
        parts[c] = storage.read_json(uri)
    card = _group_card(plan, parts)
    storage.write_json(storage.join(plan.uri, "model.json"), card)
    return card


def train(cfg: TrainConfig, root: str | None = None, progress: Progress | None = None) -> TrainResult:
    """Train the model ``cfg`` asks for (resuming or skipping what exists); returns its URI and card."""
    plan = plan_run(cfg, root)
    card_uri = storage.join(plan.uri, "model.json")
    if storage.exists(card_uri):
        return TrainResult(plan.uri, storage.read_json(card_uri), existed=True)
    parts = plan.parts
    total = plan.cfg.steps * len(parts)
    cards = {}
    for i, c in enumerate(parts):
        cards[c] = train_part(plan, c, progress, progress_offset=i * plan.cfg.steps, progress_total=total)
    info = ensure_process_group(resolve_device(plan.cfg.device).type)
    if plan.cfg.mode == "per-class" and info.is_main:
        card = finish_group(plan)
    else:
        card = cards[None] if plan.cfg.mode == "conditional" else {}
    barrier(info)
    if not info.is_main:
        card = storage.read_json(card_uri)
    return TrainResult(plan.uri, card, existed=False)


def main(argv: list[str] | None = None) -> None:
    """``python -m meddiff.train`` / ``torchrun -m meddiff.train``: the ``meddiff train`` command."""
    import torch.distributed as dist

    from .cli import main as cli_main

    sys.argv = ["meddiff", "train", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
