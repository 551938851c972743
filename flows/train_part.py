"""Prefect flow ``train-part``: one class model of a per-class training run (deployment ``train-part/default``
on the gpu pool, one worker per GPU, so each part trains on its worker's own GPU).

``train-model`` with ``parallel_classes=True`` under a server starts one run per unfinished class
and writes the group ``model.json`` once all are complete. A finished part is found, not retrained;
an interrupted one resumes from its latest checkpoint (checkpoints are written atomically).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import Literal

from prefect import flow, get_run_logger

from flows.common import prefect_progress
import meddiff.train as tr
from flows.train_model import PresetName, config_from
from meddiff.errors import MeddiffError
from meddiff.train import TrainConfig, plan_run

PART_TIMEOUT_S = 24 * 3600  # one class model; a day means a hung worker
_D = TrainConfig("")  # the library's defaults, restated as the flow's (tests/test_flow_defaults.py)


def log_interrupted(flow, flow_run, state) -> None:
    """on_failure/on_crashed hook: checkpoints and cards are written atomically (temp file + rename),
    so storage is consistent as it stands; the next run of the same part resumes from its latest
    checkpoint. Say so in the run's log, where the operator looks."""
    get_run_logger().warning("train-part %s ended %s: finished checkpoints are kept and the next run of the same "
                             "request resumes from the latest one", flow_run.name, state.name)


@flow(name="train-part", timeout_seconds=PART_TIMEOUT_S, on_failure=[log_interrupted], on_crashed=[log_interrupted])
def train_part(  # named like the flow: `prefect deploy --name train-part/...` matches it
    dataset_uri: str,
    class_id: int,
    mode: Literal["per-class"] = "per-class",
    preset: PresetName = _D.preset,
    steps: int | None = _D.steps,
    batch_size: int | None = _D.batch_size,
    resume: bool = _D.resume,
    device: str = _D.device,
    objective: Literal["ddpm", "rflow"] = _D.objective,
    schedule: Literal["linear", "cosine", "sigmoid"] = _D.schedule,
    prediction: Literal["epsilon", "v"] = _D.prediction,
    min_snr_gamma: float | None = _D.min_snr_gamma,
    seed: int = _D.seed,
    storage_root: str | None = None,
    latent: str | None = _D.latent,
    run_id: str | None = None,
    lr: float | None = _D.lr,
    label_dropout: float = _D.label_dropout,
    hflip: bool = _D.hflip,
    vflip: bool = _D.vflip,
    network_channels: list[int] | None = None,
    attention_levels: str | None = _D.attention_levels,
    run_name: str | None = _D.run_name,
    checkpoint_every: int | None = _D.checkpoint_every,
    sample_every: int | None = _D.sample_every,
    log_every: int | None = _D.log_every,
    keep: int = _D.keep,
    compile: bool = _D.compile,
    cpu_threads: int | None = _D.cpu_threads,
    preview_steps: int = _D.preview_steps,
    num_workers: int = _D.num_workers,
) -> str:
    """Train (or resume, or find) class ``class_id``'s model of a per-class run; returns the part's URI.

    Args:
        dataset_uri: The ingested dataset version of the per-class run.
        class_id: The class whose model this run trains (one of the run's parts).
        mode: Always per-class (conditional models are one run, not parts).
        preset: Network and training size: tiny (CPU/CI), small, base.
        steps: Optimiser steps of this class's model; empty = the preset's default.
        batch_size: Batch size; empty = the preset's default.
        resume: Continue from the latest checkpoint of the same part; off = start over.
        device: auto (this worker's GPU when it has one, else CPU), cpu, cuda or cuda:N.
        objective: ddpm (Ho et al. 2020) or rflow (rectified flow).
        schedule: DDPM beta schedule.
        prediction: DDPM network target.
        min_snr_gamma: Min-SNR-γ loss weighting (γ=5 typical; DDPM only); empty = off.
        seed: Seeds weights, noise, timesteps and data order.
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
        latent: Autoencoder URI of a latent per-class run (its parts train on the latents); empty = pixels.
        run_id: The parent train-model run's id: the part refuses to train another run's part (a worker
            with other meddiff code, or a parameter lost on the way); empty = no check.
        lr: Peak learning rate; empty = the preset's.
        label_dropout: The parent run's (part of its id; unconditional class models draw no labels).
        hflip: Random horizontal flips.
        vflip: Random vertical flips.
        network_channels: U-Net channels per level; empty = the preset's.
        attention_levels: none, coarse, coarsest, all, or one 0/1 per level; empty = the preset's.
        run_name: The per-class run's fixed id, if it has one.
        checkpoint_every: Steps between checkpoints; empty = the preset's.
        sample_every: Steps between preview grids; empty = the preset's.
        log_every: Steps between metrics rows; empty = the preset's.
        keep: Checkpoints kept per part.
        compile: torch.compile the network.
        cpu_threads: CPU threads of this worker's process; empty = the CPUs free when it starts.
        preview_steps: Sampler steps of the preview grids.
        num_workers: Data-loading worker processes.
    """
    cfg = config_from(dict(locals()))
    plan = plan_run(cfg, storage_root)
    if run_id is not None and plan.run_id != run_id:
        raise MeddiffError(f"train-part was asked for a part of {run_id} but its parameters plan {plan.run_id}: this "
                           "worker's meddiff differs from the parent run's, or the deployment drops a parameter; "
                           "update the workers and re-run `meddiff deploy`")
    if class_id not in plan.parts:
        raise MeddiffError(f"class {class_id} is not a part of {plan.run_id} (parts: {plan.parts})")
    tr.train_part(plan, class_id, prefect_progress(f"train {plan.run_id} class {class_id}"))
    get_run_logger().info("class %d of %s trained", class_id, plan.run_id)
    return plan.part_uri(class_id)


def part_parameters(cfg: TrainConfig, storage_root: str | None, run_id: str) -> dict:
    """The ``train-part`` parameters (all but ``class_id``) of a part of ``cfg``'s run: every config
    field the flow takes, read from its signature (so a parameter added to the flow travels without a
    second list), the storage root, and the parent's run id it must plan."""
    takes = inspect.signature(train_part.fn).parameters
    return {k: v for k, v in asdict(cfg).items() if k in takes} | {"storage_root": storage_root, "run_id": run_id}
