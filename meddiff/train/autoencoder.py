"""Autoencoder training: ``train_autoencoder(AETrainConfig(...), root) -> AETrainResult``.

Layout (like a denoiser run)::

    <root>/autoencoders/<run-id>/
        config.json  metrics.jsonl (step, loss terms, val_l1, lr, images/s, peak memory)  loss_curve.png
        samples/step-XXXXXXX/reconstructions.png (val images, their reconstructions below)
        checkpoints/step-XXXXXXX.pt (AE + discriminator + both optimisers + RNG; atomic, rotated)
        weights.pt (autoencoder weights only)  model.json (the card, last = complete)

Single process (no DDP). The latent scale factor is 1/std of the encoded latents over
``scale_batches`` training batches, estimated once at the end and recorded in the card.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meddiff import storage
from meddiff.devices import resolve_device
from meddiff.errors import ArtifactError, Interrupted, MeddiffError
from meddiff.figures import new_figure, to_png
from meddiff.interrupts import stop_on_interrupt
from meddiff.locks import artifact_lock, tell_waiting
from meddiff.models.autoencoders import latent_shape
from meddiff.models.networks import param_count
from meddiff.progress import Progress, note, tell
from meddiff.records import make_record, sha256_bytes, sha256_file, to_jsonable
from meddiff.threads import ThreadPlan, configure_threads
from meddiff.train.ae_config import AERunPlan, AETrainConfig, plan_autoencoder
from meddiff.train.ae_step import AEState, ae_step, build_ae_state, val_loss
from meddiff.train.batches import DataSpec, batches
from meddiff.train.checkpoint import (check_named_run, check_steps_ahead, checkpoint_files, finished_card,
                                      list_checkpoints, save_checkpoint)
from meddiff.train.loop import _peak_memory_mb, rng_state, set_rng_state
from meddiff.train.records import append_metrics, read_metrics, truncate_metrics, write_grid
from meddiff.train.run_folder import RunFolder
from meddiff.train.sessions import SessionLog

WEIGHTS = "weights.pt"


@dataclass(frozen=True)
class AETrainResult:
    uri: str  # the autoencoder URI (load with meddiff.models.autoencoders.load_autoencoder)
    card: dict  # its model.json
    existed: bool  # a finished autoencoder was found; no training was done


def _identity(plan: AERunPlan) -> dict[str, Any]:
    ds = plan.dataset
    return {"ae_kind": plan.cfg.kind, "channels": ds.channels, "image_size": ds.image_size,
            "autoencoder": to_jsonable(plan.definition)}


def _load_ae_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors all mean "corrupt"
        raise ArtifactError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); delete it to "
                            "resume from the previous one, or re-run with --no-resume") from e
    have = state.get("identity") or {}
    for key, want in identity.items():
        if to_jsonable(have.get(key)) != to_jsonable(want):
            raise MeddiffError(f"checkpoint {path} has a different {key} ({have.get(key)} ≠ {want}); "
                               "use another --run-name or --no-resume")
    return state


def _start(plan: AERunPlan, folder: RunFolder, device: torch.device, threads: ThreadPlan
           ) -> tuple[AEState, SessionLog]:
    """Prepare the folder, build the state, resume from the newest checkpoint if any; the session log
    starts at the step resumed from."""
    cfg = plan.cfg
    folder.local.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        shutil.rmtree(folder.local / "checkpoints", ignore_errors=True)
        (folder.local / "metrics.jsonl").unlink(missing_ok=True)
    elif folder.remote:
        folder.pull_latest()
    torch.manual_seed(cfg.seed * 1000 + 11)
    st = build_ae_state(plan, device)
    ckpts = list_checkpoints(folder.local) if cfg.resume else []
    if not ckpts:
        _write_config(plan, folder)
        torch.manual_seed(cfg.seed * 1000 + 12)
        return st, SessionLog.start(0, device, 1, threads)
    state = _load_ae_checkpoint(ckpts[-1], _identity(plan))
    if cfg.run_name:
        weights = (state.get("config") or {}).get("perceptual_weights")
        by_path = weights is not None and not re.fullmatch(r"[0-9a-f]{64}", weights)  # checkpoints before bb05494
        check_named_run(plan.run_id, state.get("config"), plan.portable_record(), False,
                        ignore=("perceptual_weights",) if by_path else ())  # a path is not compared
    check_steps_ahead(plan.run_id, int(state["step"]), cfg.steps, ckpts[-1])
    _write_config(plan, folder)  # once the checkpoint was found to fit the request
    st.load_state_dict(state)
    set_rng_state(state["rng"])
    truncate_metrics(folder.local, int(state["step"]))
    return st, SessionLog.start(int(state["step"]), device, 1, threads, ckpts[-1], state)


def _write_config(plan: AERunPlan, folder: RunFolder) -> None:
    """config.json: the request being trained."""
    storage.write_json(str(folder.local / "config.json"),
                       make_record("autoencoder-config", plan.config_record(), {"dataset": plan.dataset.uri},
                                   run_id=plan.run_id))


def _val_batches(plan: AERunPlan, device: torch.device) -> list[torch.Tensor]:
    spec = DataSpec(split="val", shuffle_buffer=0)
    stream = batches(plan.dataset, spec, min(plan.cfg.batch_size, 32), plan.cfg.seed, 0)
    return [next(stream)[0].to(device) for _ in range(plan.cfg.val_batches)]


def write_ae_curve(run_dir: Path, title: str) -> None:
    """loss_curve.png: train L1 and val L1 per logged step (log scale), plus the discriminator once on."""
    rows = read_metrics(run_dir)
    fig = new_figure(figsize=(6, 3.5), dpi=100)  # no pyplot (meddiff.figures)
    ax = fig.subplots()
    for key, label in (("l1", "train L1"), ("val_l1", "val L1"), ("disc", "discriminator")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1, label=label)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    storage.write_bytes(str(run_dir / "loss_curve.png"), to_png(fig))


@torch.no_grad()
def _write_recon_grid(st: AEState, x: torch.Tensor, path: Path) -> None:
    """Up to 8 val images with their reconstructions in the row below."""
    st.ae.eval()
    x = x[:8]
    x_hat = st.ae(x)[0].clamp(-1, 1)
    st.ae.train()
    write_grid(torch.cat([x, x_hat]).add(1).div(2), path)  # (2n, C, H, W) in [0, 1]


def _log(folder: RunFolder, st: AEState, step: int, sums: dict[str, float], n: int, val: list, t: float,
         device: torch.device, bs: int, progress: Progress | None) -> None:
    row = {"step": step, **{k: v / n for k, v in sums.items()}, "val_l1": val_loss(st, val),
           "lr": st.opt_g.param_groups[0]["lr"], "images_per_s": round(n * bs / max(t, 1e-9), 2),
           "peak_mem_mb": round(_peak_memory_mb(device), 1)}
    if not math.isfinite(row["loss"]):
        raise MeddiffError(f"the autoencoder loss became {row['loss']} by step {step}; lower --lr")
    append_metrics(folder.local, row)
    note(progress, loss=row["loss"], images_per_s=row["images_per_s"])


def _save(plan: AERunPlan, folder: RunFolder, st: AEState, step: int, session: SessionLog) -> None:
    path = save_checkpoint(folder.local, step, {
        **st.state_dict(), "rng": rng_state(), "config": plan.portable_record(),
        "identity": _identity(plan)}, keep=plan.cfg.keep, record=session.record(step))
    write_ae_curve(folder.local, plan.run_id)
    folder.push(["metrics.jsonl", "config.json", "loss_curve.png", *checkpoint_files(path)])


def train_autoencoder(cfg: AETrainConfig, root: str | None = None, progress: Progress | None = None
                      ) -> AETrainResult:
    """Train (or resume, or find finished) the autoencoder ``cfg`` asks for; returns its URI and card."""
    plan = plan_autoencoder(cfg, root)
    card_uri = storage.join(plan.uri, "model.json")
    if storage.exists(card_uri):
        return AETrainResult(plan.uri, finished_card(card_uri, plan), existed=True)
    # one builder per run folder: a concurrent run of the same autoencoder waits here, then finds it finished
    with artifact_lock(plan.uri, tell_waiting(progress, plan.uri)):
        if storage.exists(card_uri):
            return AETrainResult(plan.uri, finished_card(card_uri, plan), existed=True)
        return _train_locked(plan, progress)


def _train_locked(plan: AERunPlan, progress: Progress | None) -> AETrainResult:
    cfg = plan.cfg
    device = resolve_device(cfg.device)
    threads = configure_threads()  # CPU threads that fit the machine now, as training's (meddiff.threads)
    folder = RunFolder.for_uri(plan.uri)
    st, session = _start(plan, folder, device, threads)
    step = session.first_step
    if step:
        tell(progress, f"resuming from its checkpoint at step {step} of {cfg.steps} (--no-resume starts over)")
    val = _val_batches(plan, device)
    data = batches(plan.dataset, DataSpec(), cfg.batch_size, cfg.seed, step)
    sums: dict[str, float] = {}
    n, t_last = 0, time.perf_counter()
    st.ae.train()
    with stop_on_interrupt() as stop:
        while step < cfg.steps:
            terms = ae_step(st, next(data)[0].to(device), step)
            step, n = step + 1, n + 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            is_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if step % cfg.log_every == 0 or is_ckpt:
                _log(folder, st, step, sums, n, val, time.perf_counter() - t_last, device, cfg.batch_size, progress)
                sums, n, t_last = {}, 0, time.perf_counter()
            if step % cfg.sample_every == 0 or step == cfg.steps:
                _write_recon_grid(st, val[0], folder.local / "samples" / f"step-{step:07d}" / "reconstructions.png")
            if is_ckpt:
                _save(plan, folder, st, step, session)
            if progress is not None:
                progress(step, cfg.steps)
            if stop.requested and step < cfg.steps:
                if not is_ckpt:
                    _save(plan, folder, st, step, session)
                raise Interrupted(f"stopped at step {step} of {cfg.steps}, its checkpoint saved: re-run the same "
                                  f"command to resume from step {step}")

    card = finish_autoencoder(plan, folder, st, device, session)
    return AETrainResult(plan.uri, card, existed=False)


@torch.no_grad()
def estimate_scale(st: AEState, plan: AERunPlan, device: torch.device) -> tuple[float, float, int]:
    """1 / std of the latents E(x) over ``scale_batches`` training batches (Rombach et al. 2022, App. G).

    Returns (scale_factor, latent mean, latents counted); sums in float64.
    """
    st.ae.eval()
    stream = batches(plan.dataset, DataSpec(), plan.cfg.batch_size, plan.cfg.seed + 1, 0)
    s = s2 = torch.zeros((), dtype=torch.float64)
    count = 0
    for _ in range(plan.train.scale_batches):
        z = st.ae.encode(next(stream)[0].to(device)).double().cpu()  # (B, C_lat, h, w)
        s, s2, count = s + z.sum(), s2 + z.pow(2).sum(), count + z.numel()
    mean = s / count
    std = float((s2 / count - mean**2).clamp_min(1e-12).sqrt())
    return 1.0 / std, float(mean), count


def compression(plan: AERunPlan, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Bytes per image: 8-bit pixels vs float16 latents (VAE) or ⌈log2 K⌉-bit codes (VQ-VAE)."""
    ds = plan.dataset
    pixel_bytes = ds.channels * ds.image_size**2
    if plan.cfg.kind == "vae":
        latent_bytes = 2 * shape[0] * shape[1] * shape[2]
    else:
        latent_bytes = math.ceil(shape[1] * shape[2] * math.ceil(math.log2(plan.definition.num_embeddings)) / 8)
    return {"pixel_bytes": pixel_bytes, "latent_bytes": latent_bytes,
            "compression_ratio": round(pixel_bytes / latent_bytes, 3)}


def finish_autoencoder(plan: AERunPlan, folder: RunFolder, st: AEState, device: torch.device,
                       session: SessionLog) -> dict[str, Any]:
    """Scale factor, weights.pt, loss curve, then the card (model.json) last."""
    ds, cfg = plan.dataset, plan.cfg
    ckpt = list_checkpoints(folder.local)[-1]
    if int(ckpt.name[5:12]) != cfg.steps:
        raise ArtifactError(f"{folder.local} has no checkpoint for the final step {cfg.steps}")
    scale, mean, count = estimate_scale(st, plan, device)
    with storage.atomic_file(folder.local / WEIGHTS) as f:
        torch.save({"autoencoder": {k: v.cpu() for k, v in st.ae.state_dict().items()}}, f)
    write_ae_curve(folder.local, plan.run_id)
    rows = read_metrics(folder.local)
    shape = latent_shape(plan.definition, ds.image_size)
    dataset_card_sha = sha256_bytes(storage.read_bytes(storage.join(ds.uri, "dataset.json")))
    card = make_record(
        "autoencoder", plan.config_record(),
        {"dataset": {"uri": ds.uri, "version": ds.version, "card_sha256": dataset_card_sha}},
        uri=folder.uri, run_id=plan.run_id, preset=cfg.preset, **_identity(plan),
        dataset={"uri": ds.uri, "name": ds.card.get("name"), "version": ds.version}, class_names=ds.class_names,
        latent_shape=list(shape), factor=plan.definition.factor, scale_factor=scale, latent_mean=mean,
        scale_estimate={"batches": plan.train.scale_batches, "batch_size": cfg.batch_size, "latents": count},
        **compression(plan, shape), param_count=param_count(st.ae), steps=cfg.steps,
        final={k: rows[-1].get(k) for k in ("l1", "val_l1", "kl", "vq", "gen_adv", "disc")} if rows else {},
        wall_time_s=round(session.wall_time(), 2), sessions=session.sessions(cfg.steps), device=str(device),
        checkpoint=f"checkpoints/{ckpt.name}",
        weights=WEIGHTS, weights_sha256=sha256_file(folder.local / WEIGHTS), samples=f"samples/step-{cfg.steps:07d}",
        weights_config=plan.portable_record())
    storage.write_json(str(folder.local / "model.json"), card)
    samples = [p.relative_to(folder.local).as_posix() for p in sorted((folder.local / "samples").rglob("*.png"))]
    folder.push(["config.json", "metrics.jsonl", "loss_curve.png", *checkpoint_files(ckpt), WEIGHTS, *samples,
                 "model.json"])
    return card
