"""Prefect flow ``train-model``: the same parameters as ``meddiff train`` (meant for a GPU work pool).

Conditional mode is one task run; per-class mode is one task run per class (each its own run
folder), sequential by default or fanned out concurrently with ``parallel_classes=True``, then a
task that writes the group card. A re-run skips finished parts and resumes unfinished ones.
Progress (step, loss, images/s, ETA) goes to the run logger every ~30 s and to a progress artifact.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import fields, replace
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import (required, RESULT_OPTIONS, artifact_key, dataset_tag, explain_wait, link_url, LoggedProgress,
                          one_traceback_per_failure, phrased, prefect_progress, publish_link, retry_transient,
                          tag_run, user_errors)
from meddiff import storage
from meddiff.devices import part_device, resolve_device
from meddiff.progress import combine, rich_progress
from meddiff.train import TrainConfig, finish_group, plan_run, train_part
from meddiff.train.presets import PRESETS

_D = TrainConfig("")  # the library's defaults: the flow restates them (tests/test_flow_defaults.py)
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  (the UI shows a choice list)


def flow_run_title() -> str:
    """``train-<dataset>-<mode>`` from the run's parameters."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"train-{dataset_tag(p['dataset_uri']).split(':', 1)[1]}-{p.get('mode', _D.mode)}"


def leave_resumable(flow, flow_run, state) -> None:
    """On cancellation: keep a run folder that has checkpoints (the same request resumes from the latest)
    and remove one without any (see :func:`tidy_interrupted`; the flow itself also calls it when the
    worker's SIGTERM interrupts training, as Prefect 3.8's process worker may not run this hook)."""
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    p = flow_run.parameters
    try:
        plan = plan_run(config_from(p), p.get("storage_root"))
    except Exception as e:  # noqa: BLE001 - a run cancelled before its plan existed left nothing
        logger.info("cancelled before training started (%s)", e)
        return
    tidy_interrupted(plan, logger)


def tidy_interrupted(plan, logger) -> None:
    """Keep a run folder that has checkpoints (the same request resumes from the latest) and remove
    one without any (nothing to resume: it would only look like a model in progress)."""
    import shutil
    from pathlib import Path

    if storage.is_remote(plan.uri) or storage.exists(storage.join(plan.uri, "model.json")):  # nothing to tidy
        logger.info("cancelled; %s keeps its checkpoints: the same request resumes from the latest", plan.uri)
        return
    folder = Path(plan.uri)  # local root: a half-started folder with nothing to resume is removed
    checkpoints = sorted(folder.rglob("checkpoints/*.pt"))
    if checkpoints:
        logger.info("cancelled; %s kept with %d checkpoint(s) (latest %s): the same request resumes there",
                    plan.uri, len(checkpoints), checkpoints[-1].relative_to(folder))
    elif folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("cancelled before the first checkpoint; removed %s (nothing to resume)", plan.uri)


def config_from(p: dict) -> TrainConfig:
    """The flow's TrainConfig from its parameters (a dict, as the hooks see them): each TrainConfig field
    among them, the rest (storage root, fan-out switches) left to the flow."""
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in p.items() if k in names}
    if given.get("network_channels") is not None:  # a JSON list in the parameters
        given["network_channels"] = tuple(given["network_channels"])
    return TrainConfig(**given).check()


@task(name="train-part", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
@phrased
def train_part_task(cfg: TrainConfig, storage_root: str | None, class_id: int | None, bar: bool = True) -> dict:
    plan = plan_run(cfg, storage_root)
    what = f"train {plan.run_id}" + ("" if class_id is None else f" class {class_id}")
    logger = get_run_logger()
    logger.info("%s: %d steps of batch %d on %s → %s", what, plan.cfg.steps, plan.cfg.batch_size,
                resolve_device(plan.cfg.device), plan.part_uri(class_id))
    logged = LoggedProgress(logger, "train" + ("" if class_id is None else f" class {class_id}"))
    with rich_progress(what) if bar else nullcontext(None) as terminal:  # one rich bar at a time
        return train_part(plan, class_id, combine(prefect_progress(what), logged, terminal))


def fan_out_parts(cfg: TrainConfig, plan, storage_root: str | None, logger) -> bool:
    """Under a server with a train-part deployment: one flow run per class part (see flows/fanout.py)."""
    from flows.fanout import PART_DEPLOYMENT, FanoutConfig, train_parts_fanned_out
    from flows.train_part import part_parameters  # it imports this module

    params = part_parameters(cfg, storage_root, plan.run_id)
    return train_parts_fanned_out(params, plan.run_id, list(plan.parts),
                                  lambda c: storage.exists(storage.join(plan.part_uri(c), "model.json")),
                                  FanoutConfig(deployment=PART_DEPLOYMENT, poll_s=15.0), logger.info)


@task(name="finish-group", cache_policy=NO_CACHE)
def finish_group_task(cfg: TrainConfig, storage_root: str | None) -> dict:
    return finish_group(plan_run(cfg, storage_root))


def card_markdown(card: dict) -> str:
    lines = [f"# Model `{card['run_id']}`", "", f"URI: [{card['uri']}]({link_url(card['uri'])})", "",
             f"- mode: {card['mode']}, preset: {card['preset']}, objective: {card['objective']}",
             f"- dataset: [{card['dataset']['uri']}]({link_url(card['dataset']['uri'])}) "
             f"({len(card['class_names'])} classes)",
             f"- steps: {card['steps']}, parameters: {card['param_count']:,}, wall time: {card['wall_time_s']} s, "
             f"device: {card['device']}"]
    if card.get("final_loss") is not None:
        lines.append(f"- final loss: {card['final_loss']:.4f}")
    return "\n".join(lines)


@flow(name="train-model", flow_run_name=flow_run_title, on_cancellation=[leave_resumable], **RESULT_OPTIONS)
def train_model(
    dataset_uri: str,
    mode: Literal["conditional", "per-class"] = _D.mode,
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
    parallel_classes: bool = False,
    latent: str | None = _D.latent,
    conditioning: Literal["embedding", "cross-attention"] = _D.conditioning,
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
    """Train (or resume, or find) a conditional or per-class diffusion model; returns its URI (the run's persisted result).

    Args:
        dataset_uri: An ingested dataset version (the ingest-dataset run's result), e.g. storage/datasets/bloodmnist/<version>.
        mode: One class-conditional model (classifier-free guidance), or one unconditional model per class.
        preset: Network and training size: tiny (CPU/CI), small, base.
        steps: Optimiser steps (per class in per-class mode); empty = the preset's default.
        batch_size: Global batch size; empty = the preset's default.
        resume: Continue from the latest checkpoint of the same run; off = start over.
        device: auto (a GPU when the worker has one, else CPU), cpu, cuda or cuda:N.
        objective: ddpm (Ho et al. 2020) or rflow (rectified flow).
        schedule: DDPM beta schedule.
        prediction: DDPM network target.
        min_snr_gamma: Min-SNR-γ loss weighting (γ=5 typical; DDPM only); empty = off.
        seed: Seeds weights, noise, timesteps, label dropout and data order.
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
        parallel_classes: Per-class mode: train the classes side by side (class k on GPU k mod the visible GPUs).
        latent: Autoencoder URI (train-autoencoder's result): train on its latents (latent diffusion); empty = pixels.
        conditioning: Conditional mode: class embedding, or a learned label embedding through cross-attention.
        lr: Peak learning rate; empty = the preset's.
        label_dropout: Conditional mode: probability of the null label (classifier-free guidance).
        hflip: Random horizontal flips (only if the domain is left-right symmetric).
        vflip: Random vertical flips (only if the domain allows it).
        network_channels: U-Net channels per level, e.g. [64, 128, 256]; empty = the preset's.
        attention_levels: none, coarse, coarsest, all, or one 0/1 per level ("0,1,1"); empty = the preset's.
        run_name: A fixed run id instead of the content hash (only steps may change until it finishes).
        checkpoint_every: Steps between checkpoints; empty = the preset's.
        sample_every: Steps between preview grids; empty = the preset's.
        log_every: Steps between metrics rows; empty = the preset's.
        keep: Checkpoints kept per run folder.
        compile: torch.compile the network (faster steps on a GPU after a compile of a minute or so).
        cpu_threads: CPU threads per process; empty = the CPUs free when it starts.
        preview_steps: Sampler steps of the preview grids.
        num_workers: Data-loading worker processes (capped at the shard count).
    """
    params = dict(locals())  # the parameters, as the hooks see them
    one_traceback_per_failure()
    explain_wait()
    logger = get_run_logger()
    tag_run(dataset_tag(dataset_uri))
    with user_errors():
        required(dataset_uri, "dataset_uri", "ingest-dataset")
        cfg = config_from(params)
        plan = plan_run(cfg, storage_root)
        if storage.exists(storage.join(plan.uri, "model.json")):
            logger.info("found existing model %s", plan.uri)
            card = storage.read_json(storage.join(plan.uri, "model.json"))
        else:
            try:
                card = _train(cfg, plan, storage_root, parallel_classes)
            except BaseException as e:
                if not isinstance(e, Exception):  # cancelled (the worker's SIGTERM) or interrupted
                    tidy_interrupted(plan, logger)
                raise
    create_markdown_artifact(card_markdown(card), key=artifact_key("model", plan.run_id), description="model card")
    publish_link("model", plan.uri, plan.run_id, target=storage.join(plan.uri, "model.json"))
    logger.info("result: %s", plan.uri)
    return plan.uri


def _train(cfg: TrainConfig, plan, storage_root: str | None, parallel_classes: bool) -> dict:
    if plan.cfg.mode == "conditional":
        return train_part_task(cfg, storage_root, None)
    if parallel_classes and fan_out_parts(cfg, plan, storage_root, get_run_logger()):
        pass  # each part was its own train-part run on a gpu worker (its own GPU)
    elif parallel_classes:  # side by side in this process: part k on GPU k mod (visible GPUs)
        futures = [train_part_task.submit(replace(cfg, device=part_device(cfg.device, k)), storage_root, c,
                                          bar=False) for k, c in enumerate(plan.parts)]
        for fut in futures:
            fut.result()
    else:
        for c in plan.parts:
            train_part_task(cfg, storage_root, c)
    return finish_group_task(cfg, storage_root)
