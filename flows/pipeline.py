"""Prefect flow ``pipeline``: ingest → train → generate → evaluate, each stage a task with retries.

The stages are :func:`meddiff.pipeline.run_pipeline`'s; this flow only runs each one as a Prefect
task (retried on transient I/O errors), with a progress artifact per stage and log lines in the
run logger. Stages whose output already exists are skipped (content-addressed outputs).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key, prefect_progress, retry_transient
from meddiff.pipeline import PipelineConfig, PipelineResult, run_pipeline
from meddiff.progress import combine

# object storage and downloads are retried with backoff; training is not (it resumes from checkpoints)
RETRIES = {"ingest": 2, "train-autoencoder": 1, "encode": 2, "train": 1, "generate": 2, "evaluate": 2}


def log_progress(logger, stage: str, min_interval_s: float = 15.0) -> Callable[[int, int], None]:
    """A progress callback that logs ``stage: done/total`` at most every ``min_interval_s``."""
    from meddiff.progress import throttled

    return throttled(lambda done, total: logger.info("%s: %d/%d", stage, done, total), min_interval_s)


def run_as_task(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    retries = RETRIES.get(stage, 0)
    # no Prefect result caching: the stages' outputs are content-addressed and found by the library
    return task(fn, name=stage, retries=retries, retry_delay_seconds=[5, 30][:retries] or 0,
                retry_condition_fn=retry_transient, cache_policy=NO_CACHE)(*args)


def result_markdown(result: PipelineResult) -> str:
    lines = ["# Pipeline", "", "| stage | output | skipped |", "|---|---|---|"]
    lines += [f"| {s.stage} | `{s.uri}` | {'yes' if s.existed else 'no'} |" for s in result.stages]
    return "\n".join(lines)


@flow(name="pipeline")
def pipeline(
    dataset: str = "medmnist:bloodmnist",
    size: int | None = None,
    medmnist_root: str | None = None,
    mode: Literal["conditional", "per-class"] = "conditional",
    preset: str = "tiny",
    steps: int | None = 800,
    batch_size: int | None = None,
    preview_steps: int | None = None,
    per_class: int | None = 50,
    total: int | None = None,
    sampler: str = "auto",
    sample_steps: int = 50,
    guidance: float | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    allow_cpu_fallback: bool = False,
    seed: int = 0,
    evaluate: bool = True,
    eval_features: list[str] | None = None,
    eval_max_images: int | None = 300,
    domain_steps: int | None = None,
    objective: Literal["ddpm", "rflow"] = "rflow",
    storage_root: str | None = None,
    latent: Literal["vae", "vqvae"] | None = None,
    ae_preset: str = "tiny",
    ae_steps: int | None = None,
    latent_umap: bool = True,
) -> dict:
    """The whole job: a dataset source in, a synthetic cohort and its quality report out."""
    logger = get_run_logger()
    cfg = PipelineConfig(dataset, size, medmnist_root, mode, preset, steps, batch_size, preview_steps, per_class, total,
                         sampler, sample_steps, guidance, device, allow_cpu_fallback, seed, evaluate,
                         tuple(eval_features) if eval_features else None, eval_max_images, domain_steps, objective,
                         latent, ae_preset, ae_steps, latent_umap)

    def progress(stage: str):
        return combine(prefect_progress(f"{stage} ({dataset})"), log_progress(logger, stage))

    result = run_pipeline(cfg, storage_root, progress, call=run_as_task, log=logger.info)
    create_markdown_artifact(result_markdown(result), key=artifact_key("pipeline", dataset),
                             description="pipeline outputs")
    logger.info("report: %s", result.report_uri)
    return result.to_dict()
