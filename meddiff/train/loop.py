"""The training loop: train (or resume, or find finished) one network per part of a ``RunPlan``.

Library entry point: ``train(TrainConfig(...), root) -> TrainResult``. Multi-process:
``torchrun --nproc_per_node N -m meddiff.train DATASET_URI [options of 'meddiff train']``.

Layout::

    <root>/models/<run-id>/                 conditional: one run folder
        config.json  metrics.jsonl  loss_curve.png  samples/step-XXXXXXX/class-<i>.png
        checkpoints/step-XXXXXXX.pt  model.json   (model.json last = complete)
    <root>/models/<run-id>/                 per-class: a group
        class-<i>/ (one run folder each, as above)  model.json (group card, last)
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meddiff import storage
from meddiff.devices import resolve_device
from meddiff.errors import Interrupted, MeddiffError
from meddiff.interrupts import stop_on_interrupt
from meddiff.models.diffusion import build_scheduler
from meddiff.progress import Progress, note, tell
from meddiff.records import make_record, to_jsonable
from meddiff.train.batches import DataSpec, batches
from meddiff.train.cards import finish_group, finish_part
from meddiff.train.checkpoint import (check_named_run, check_steps_ahead, checkpoint_files, finished_card,
                                      list_checkpoints, load_checkpoint, save_checkpoint)
from meddiff.train.config import RunPlan, TrainConfig, TrainResult, plan_run
from meddiff.train.distributed import DistInfo, barrier, ensure_process_group, env_info, mean_across
from meddiff.train.records import (append_metrics, preview_samples, truncate_metrics, write_grid,
                                   write_loss_curve)
from meddiff.locks import artifact_lock, tell_waiting
from meddiff.threads import ThreadPlan, configure_threads
from meddiff.train.run_folder import RunFolder
from meddiff.train.sessions import SessionLog
from meddiff.train.step import TrainingState, build_training_state, drop_labels, train_step
from meddiff.train.val_loss import ValProbe, load_probe

PREVIEW_PER_CLASS = 8  # images per class in each preview grid
_INIT_LOCK = threading.Lock()  # torch's global generator is one per process: one part seeds it and draws its
# initial weights at a time (parts trained side by side run in threads; each trains on its own generator)


# --------------------------------------------------------------------------- process and RNG

def process_device(requested: str, info: DistInfo | None = None) -> torch.device:
    """This process's device: under torchrun, rank r on GPU ``N + local_rank`` (see meddiff.devices)."""
    info = info or env_info()
    return resolve_device(requested, local_rank=info.local_rank, world=info.world)


def _set_cpu_threads(cfg: TrainConfig, device: torch.device, info: DistInfo) -> ThreadPlan:
    """Size the CPU thread pool for this machine now (meddiff.threads); ranks on one host share it."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world)) if device.type == "cpu" else 1
    return configure_threads(cfg.cpu_threads, local_world)


def generator_state(gen: torch.Generator) -> dict[str, Any]:
    """A checkpoint's ``rng``: the part's own training stream (ε, t, dropped labels) and its device type."""
    return {"generator": gen.get_state(), "device": gen.device.type}


def restore_generator(gen: torch.Generator, rng: dict[str, Any]) -> bool:
    """Continue a checkpoint's training stream in ``gen``. Checkpoints from before per-part generators
    saved torch's global streams, which training drew from: the CPU one, or the GPU's own. False (a fresh
    stream, then) when the stream was on another kind of device or GPU count."""
    if "generator" in rng:
        state, kind = rng["generator"], rng["device"]
    elif gen.device.type == "cpu":
        state, kind = rng["torch"], "cpu"
    else:
        streams, index = rng.get("cuda") or [], gen.device.index or 0
        state, kind = (streams[index], "cuda") if index < len(streams) else (None, None)
    if state is None or kind != gen.device.type:
        return False
    gen.set_state(state.cpu())  # the setter takes a CPU ByteTensor
    return True


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()`` (torch's global streams: autoencoder training). The setters take CPU
    ByteTensors only, so states are moved there first."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])  # (another GPU count: fresh streams)


def load_resume_state(path: Path) -> dict[str, Any]:
    """A checkpoint to resume from, read onto the CPU: ``load_state_dict`` copies weights and optimiser
    moments onto the network's device, and the RNG setters accept CPU ByteTensors only (a checkpoint
    mapped onto a GPU made every resumed GPU run fail with "RNG state must be a torch.ByteTensor")."""
    return load_checkpoint(path, map_location="cpu")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (peak RSS)


# --------------------------------------------------------------------------- one part

def portable_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """A part's identity as its checkpoints keep it: the autoencoder of a latent run by what it is
    (sha256, scale, latent shape), not where it lies, so a copied or moved root, or a worker that
    mounts the storage elsewhere, resumes the run and writes the same bytes (the card keeps the URI)."""
    latent = identity.get("latent")
    return identity if latent is None else {**identity, "latent": {k: v for k, v in latent.items() if k != "uri"}}


def _check_compatible(state: dict[str, Any], part: dict[str, Any], path: Path) -> None:
    """A checkpoint being resumed must come from the same classes and the same network."""
    state, part = portable_identity(state), portable_identity(part)  # checkpoints from before kept the AE's URI
    if state.get("num_classes") != part["num_classes"]:
        raise MeddiffError(f"checkpoint {path} was trained on {state.get('num_classes')} classes but the dataset "
                           f"has {part['num_classes']}; use another run name or --no-resume")
    for key in ("network", "channels", "image_size", "class_id", "num_class_embeds", "scheduler_config", "latent",
                "conditioning"):
        default = "embedding" if key == "conditioning" else None  # checkpoints from before latent diffusion
        if to_jsonable(state.get(key, default)) != to_jsonable(part.get(key, default)):
            raise MeddiffError(f"checkpoint {path} has a different {key} ({state.get(key)} ≠ {part[key]}); "
                               f"use another run name or --no-resume")


def part_identity(plan: RunPlan, class_id: int | None) -> dict[str, Any]:
    """What a part's network is: stored in its checkpoints and its card (load_model rebuilds from it)."""
    ds = plan.dataset
    return {"class_id": class_id, "num_classes": ds.num_classes, "channels": ds.channels,
            "image_size": ds.image_size, "network": to_jsonable(plan.network),
            "num_class_embeds": ds.num_classes + 1 if class_id is None else None,
            "scheduler_config": plan.scheduler_config, "latent": plan.autoencoder,
            "conditioning": plan.cfg.conditioning if class_id is None else "embedding"}


@dataclass
class PartRun:
    """One part's training in progress: where it writes, what it trains, how far it is."""

    plan: RunPlan
    class_id: int | None
    folder: RunFolder
    identity: dict[str, Any]
    info: DistInfo
    device: torch.device
    st: TrainingState
    gen: torch.Generator  # this part's training stream (ε, t, dropped labels), on its device
    session: SessionLog  # this session and the recorded ones it resumed from (wall time, CPU threads)
    step: int = 0  # optimiser steps done
    last_saved: int = -1  # step of the newest checkpoint

    @property
    def title(self) -> str:
        return self.plan.run_id if self.class_id is None else f"{self.plan.run_id} class {self.class_id}"


def _prepare_folder(plan: RunPlan, folder: RunFolder) -> None:
    """Rank 0: create (or, without resume, clear) the run folder; fetch remote state."""
    folder.local.mkdir(parents=True, exist_ok=True)
    if not plan.cfg.resume:
        shutil.rmtree(folder.local / "checkpoints", ignore_errors=True)
        (folder.local / "metrics.jsonl").unlink(missing_ok=True)
    elif folder.remote:
        folder.pull_latest()


def _write_config(plan: RunPlan, folder: RunFolder, identity: dict[str, Any]) -> None:
    """Rank 0: config.json, the request being trained (once its checkpoint, if any, was found to fit)."""
    config_rec = make_record("train-config", plan.config_record(), {"dataset": plan.dataset.uri}, part=identity,
                             run_id=plan.run_id)
    storage.write_json(str(folder.local / "config.json"), config_rec)


def _start_part(plan: RunPlan, class_id: int | None, device: torch.device, info: DistInfo,
                threads: ThreadPlan) -> PartRun:
    """Prepare the folder (rank 0), build the state, resume from the newest checkpoint if any."""
    cfg = plan.cfg
    folder = RunFolder.for_uri(plan.part_uri(class_id))
    identity = part_identity(plan, class_id)
    if info.is_main:
        _prepare_folder(plan, folder)
    barrier(info)
    with _INIT_LOCK:
        torch.manual_seed(cfg.seed * 1000 + (class_id or 0) * 7 + 1)  # same initial weights on every rank
        st = build_training_state(plan.network, plan.net_channels, identity["num_class_embeds"], device, cfg.lr,
                                  cfg.weight_decay, cfg.warmup_steps, cfg.ema_decay, identity["conditioning"])
    run = PartRun(plan, class_id, folder, identity, info, device, st, torch.Generator(device),
                  SessionLog.start(0, device, info.world, threads))
    resumed = False
    ckpts = list_checkpoints(folder.local) if cfg.resume else []
    if ckpts:
        state = load_resume_state(ckpts[-1])
        _check_compatible(state, identity, ckpts[-1])
        if cfg.run_name:  # the autoencoder is compared by _check_compatible (older checkpoints name it by URI)
            check_named_run(plan.run_id, state.get("config"), plan.portable_record(), False, ignore=("latent",))
        check_steps_ahead(plan.run_id, int(state["step"]), cfg.steps, ckpts[-1])
        st.load_state_dict(state)
        run.step = run.last_saved = int(state["step"])
        run.session = SessionLog.start(run.step, device, info.world, threads, ckpts[-1], state)
        if info.is_main:
            resumed = restore_generator(run.gen, state["rng"])  # rank 0 continues its exact random stream
            truncate_metrics(folder.local, run.step)
    elif info.is_main and (folder.local / "metrics.jsonl").exists():
        truncate_metrics(folder.local, 0)  # rows of a session killed before its first checkpoint (chaos)
    if info.is_main:
        _write_config(plan, folder, identity)
    if not resumed:
        run.gen.manual_seed(cfg.seed * 1000 + (class_id or 0) * 7 + 2 + 7919 * info.rank + run.step)
    barrier(info)
    return run


def _wrap(run: PartRun) -> torch.nn.Module:
    """The module the step calls: DDP across ranks, ``torch.compile`` when asked."""
    model: torch.nn.Module = run.st.net
    if run.info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(run.st.net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return torch.compile(model) if run.plan.cfg.compile else model


def _save(run: PartRun) -> None:
    """Rank 0 writes the checkpoint of ``run.step`` (atomic, rotated) and pushes it; all ranks wait."""
    run.last_saved = run.step
    if run.info.is_main:
        path = save_checkpoint(run.folder.local, run.step, {
            **run.st.state_dict(), "rng": generator_state(run.gen),
            "config": run.plan.portable_record(), **portable_identity(run.identity)},
            keep=run.plan.cfg.keep, record=run.session.record(run.step))
        write_loss_curve(run.folder.local, run.title)
        run.folder.push(["metrics.jsonl", "config.json", "loss_curve.png", *checkpoint_files(path)])
    barrier(run.info)


def _log(run: PartRun, mean_loss: float, images_per_s: float, val_loss: float | None = None) -> None:
    if not math.isfinite(mean_loss):
        raise MeddiffError(f"the loss became {mean_loss} by step {run.step}; lower --lr or use another "
                           f"schedule; the last good checkpoint is kept (step {max(run.last_saved, 0)})")
    if run.info.is_main:
        append_metrics(run.folder.local, {
            "step": run.step, "loss": mean_loss, "lr": run.st.lr_sched.get_last_lr()[0],
            "images_per_s": images_per_s, "peak_mem_mb": round(_peak_memory_mb(run.device), 1),
            "class_id": run.class_id, **({} if val_loss is None else {"val_loss": val_loss})})


def _val_probe(run: PartRun, scheduler, ae) -> ValProbe | None:
    """Rank 0's fixed val-split draws for this part (None without a val split): the val loss of the EMA
    network on them is logged with every checkpoint (meddiff.train.val_loss)."""
    if not run.info.is_main:
        return None
    encode = None if ae is None else (lambda x: ae.to_latent(x.to(run.device)))  # (n, C, H, W) → latents
    return load_probe(run.plan.dataset, run.class_id, scheduler, seed=run.plan.cfg.seed, encode=encode)


def _write_previews(run: PartRun, ae=None) -> None:
    plan, ds, n = run.plan, run.plan.dataset, PREVIEW_PER_CLASS
    classes = [run.class_id] if run.class_id is not None else list(range(ds.num_classes))
    labels = None if run.class_id is not None else torch.arange(ds.num_classes).repeat_interleave(n)  # (K·n,)
    ema_net = run.st.ema.module
    ema_net.eval()
    imgs = preview_samples(ema_net, plan.scheduler_config, labels, n * len(classes), plan.net_channels,
                           plan.net_size, run.device, seed=plan.cfg.seed, steps=plan.cfg.preview_steps,
                           latent=ae is not None)
    if ae is not None:  # latents (n, C_lat, h, w) → decoded images (n, C, H, W) in [0, 1]
        imgs = ae.from_latent(imgs).add(1).div(2)
    for i, cid in enumerate(classes):
        write_grid(imgs[i * n:(i + 1) * n], run.folder.local / "samples" / f"step-{run.step:07d}" / f"class-{cid}.png")
    ema_net.train()


def train_part(plan: RunPlan, class_id: int | None, progress: Progress | None = None,
               progress_offset: int = 0, progress_total: int | None = None) -> dict[str, Any]:
    """Train (or resume, or find finished) one network; returns its card. Only rank 0 writes."""
    cfg = plan.cfg
    card_uri = storage.join(plan.part_uri(class_id), "model.json")
    if storage.exists(card_uri):
        return finished_card(card_uri, plan)
    device = process_device(cfg.device)
    info = ensure_process_group(device)
    if cfg.batch_size % info.world:
        raise MeddiffError(f"batch size {cfg.batch_size} is not divisible by the {info.world} processes")
    run = _start_part(plan, class_id, device, info, _set_cpu_threads(cfg, device, info))
    part = "" if class_id is None else f"class {plan.dataset.class_names[class_id]!r}: "
    if run.step and info.is_main:
        tell(progress, f"{part}resuming from its checkpoint at step {run.step} of {cfg.steps} "
                       f"(--no-resume starts over)")
    model, scheduler = _wrap(run), build_scheduler(plan.scheduler_config)
    spec = DataSpec(class_id=class_id, hflip=cfg.hflip, vflip=cfg.vflip, num_workers=cfg.num_workers)
    data = batches(plan.dataset, spec, cfg.batch_size // info.world, cfg.seed, run.step, info.rank, info.world)
    ae = None
    if plan.autoencoder is not None:  # latent diffusion: the same loop on z = scale · E(x)
        from meddiff.train.latent import latent_data

        ae, data = latent_data(plan, data, class_id, cfg.batch_size // info.world, run.step, info.rank, info.world,
                               device)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    probe = _val_probe(run, scheduler, ae)
    loss_sum, n_sum = torch.zeros((), device=device), 0
    t_last, step_last = time.perf_counter(), run.step

    run.st.net.train()
    with stop_on_interrupt(enabled=info.world == 1) as stop:
        while run.step < cfg.steps:
            x, y = next(data)
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            labels = None if class_id is not None else drop_labels(y.to(device), cfg.label_dropout,
                                                                   plan.dataset.num_classes, run.gen)
            loss_sum += train_step(model, run.st, scheduler, x, labels, cfg.prediction, cfg.min_snr_gamma,
                                   cfg.grad_clip, autocast, run.gen)
            run.step, n_sum = run.step + 1, n_sum + 1
            is_ckpt = run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps
            if run.step % cfg.log_every == 0 or is_ckpt:
                now = time.perf_counter()
                loss, images_per_s = float(mean_across(loss_sum / n_sum, info)), \
                    (run.step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                val_loss = probe.loss(run.st.ema.module, scheduler, cfg.prediction) if probe and is_ckpt else None
                _log(run, loss, images_per_s, val_loss)
                note(progress, loss=loss, images_per_s=images_per_s)
                loss_sum.zero_()
                n_sum, t_last, step_last = 0, now, run.step
            if info.is_main and (run.step % cfg.sample_every == 0 or run.step == cfg.steps):
                _write_previews(run, ae)
            if is_ckpt:
                _save(run)
            if progress is not None and info.is_main:
                progress(progress_offset + run.step, progress_total or cfg.steps)
            if stop.requested and run.step < cfg.steps:
                if run.last_saved != run.step:
                    _save(run)
                which = "" if class_id is None else f" (class {plan.dataset.class_names[class_id]!r})"
                raise Interrupted(f"stopped at step {run.step} of {cfg.steps}{which}, its checkpoint saved: re-run "
                                  f"the same command to resume from step {run.step}")

    card: dict[str, Any] = {}
    if info.is_main:
        card = finish_part(plan, class_id, run.identity, run.folder, run.st.ema.module, device, info, run.session)
    barrier(info)
    return card


# --------------------------------------------------------------------------- the whole model

def train(cfg: TrainConfig, root: str | None = None, progress: Progress | None = None) -> TrainResult:
    """Train the model ``cfg`` asks for (resuming or skipping what exists); returns its URI and card."""
    plan = plan_run(cfg, root)
    # one builder per run folder (rank 0 holds it for its torchrun job; other ranks follow at barriers)
    with artifact_lock(plan.uri, tell_waiting(progress, plan.uri)) if env_info().rank == 0 else nullcontext():
        return _train_locked(plan, progress)


def _train_locked(plan: RunPlan, progress: Progress | None) -> TrainResult:
    card_uri = storage.join(plan.uri, "model.json")
    if storage.exists(card_uri):
        return TrainResult(plan.uri, finished_card(card_uri, plan), existed=True)
    parts = plan.parts
    total = plan.cfg.steps * len(parts)
    cards = {}
    for i, c in enumerate(parts):
        cards[c] = train_part(plan, c, progress, progress_offset=i * plan.cfg.steps, progress_total=total)
    info = ensure_process_group(process_device(plan.cfg.device))
    if plan.cfg.mode == "per-class" and info.is_main:
        card = finish_group(plan)
    else:
        card = cards[None] if plan.cfg.mode == "conditional" else {}
    barrier(info)
    if not info.is_main:
        card = storage.read_json(card_uri)
    return TrainResult(plan.uri, card, existed=False)
