"""Prefect flow ``train-model``: the same parameters as ``meddiff train`` (meant for a GPU work pool).

Conditional mode is one task run; per-class mode is one task run per class (each its own run
folder), sequential by default or fanned out concurrently with ``parallel_classes=True``, then a
task that writes the group card. A re-run skips finished parts and resumes unfinished ones.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import artifact_key, prefect_progress, retry_transient
from meddiff import storage
from meddiff.devices import part_device
from meddiff.progress import combine, rich_progress
from meddiff.train import TrainConfig, finish_group, plan_run, train_part


@task(name="train-part", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def train_part_task(cfg: TrainConfig, storage_root: str | None, class_id: int | None, bar: bool = True) -> dict:
    plan = plan_run(cfg, storage_root)
    what = f"train {plan.run_id}" + ("" if class_id is None else f" class {class_id}")
    with rich_progress(what) if bar else nullcontext(None) as terminal:  # one rich bar at a time
        return train_part(plan, class_id, combine(prefect_progress(what), terminal))


@task(name="finish-group", cache_policy=NO_CACHE)
def finish_group_task(cfg: TrainConfig, storage_root: str | None) -> dict:
    return finish_group(plan_run(cfg, storage_root))


def card_markdown(card: dict) -> str:
    lines = [f"# Model `{card['run_id']}`", "", f"URI: `{card['uri']}`", "",
             f"- mode: {card['mode']}, preset: {card['preset']}, objective: {card['objective']}",
             f"- dataset: `{card['dataset']['uri']}` ({len(card['class_names'])} classes)",
             f"- steps: {card['steps']}, parameters: {card['param_count']:,}, wall time: {card['wall_time_s']} s, "
             f"device: {card['device']}"]
    if card.get("final_loss") is not None:
        lines.append(f"- final loss: {card['final_loss']:.4f}")
    return "\n".join(lines)


@flow(name="train-model")
def train_model(
    dataset_uri: str,
    mode: str = "conditional",
    preset: str = "tiny",
    steps: int | None = None,
    batch_size: int | None = None,
    resume: bool = True,
    device: str = "auto",
    objective: str = "ddpm",
    schedule: str = "linear",
    prediction: str = "epsilon",
    min_snr_gamma: float | None = None,
    seed: int = 0,
    storage_root: str | None = None,
    parallel_classes: bool = False,
    latent: str | None = None,
    conditioning: str = "embedding",
) -> str:
    """Train (or resume, or find) a conditional or per-class diffusion model; returns its URI."""
    logger = get_run_logger()
    cfg = TrainConfig(dataset_uri, mode, preset, steps, batch_size, device, seed, resume, objective, schedule,
                      prediction, min_snr_gamma, latent=latent,
                      conditioning=conditioning).check()  # type: ignore[arg-type]
    plan = plan_run(cfg, storage_root)
    if storage.exists(storage.join(plan.uri, "model.json")):
        logger.info("found existing model %s", plan.uri)
        return plan.uri
    if plan.cfg.mode == "conditional":
        card = train_part_task(cfg, storage_root, None)
    else:
        if parallel_classes:  # side by side in this process: part k on GPU k mod (visible GPUs)
            futures = [train_part_task.submit(replace(cfg, device=part_device(cfg.device, k)), storage_root, c,
                                              bar=False) for k, c in enumerate(plan.parts)]
            for fut in futures:
                fut.result()
        else:
            for c in plan.parts:
                train_part_task(cfg, storage_root, c)
        card = finish_group_task(cfg, storage_root)
    logger.info("model %s", plan.uri)
    create_markdown_artifact(card_markdown(card), key=artifact_key("model", plan.run_id), description="model card")
    return plan.uri
