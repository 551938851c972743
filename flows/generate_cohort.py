"""Prefect flow ``generate-cohort``: the same parameters as ``meddiff generate``, meant for a GPU pool.

Runs ``evaluate-cohort`` at the end unless ``evaluate=False``.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key, prefect_progress, retry_transient
from meddiff.devices import resolve_device
from meddiff.generate import CohortResult, CohortSpec, generate


@task(name="generate", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient)
def generate_task(spec: CohortSpec, storage_root: str | None) -> CohortResult:
    return generate(spec, storage_root, prefect_progress(f"generate from {spec.model_uri}"))


def cohort_markdown(result: CohortResult) -> str:
    c = result.card
    lines = [f"# Cohort `{c['cohort_id']}`", "", f"URI: `{result.uri}`", "",
             f"Model: `{c['model_uri']}` ({c['model_mode']}); sampler {c['sampler']} × {c['steps']} steps, "
             f"guidance {c['guidance_scale']}, seed {c['seed']}, device {c['device']}", "",
             "| class | images |", "|---|---:|"]
    lines += [f"| {name} | {n} |" for name, n in result.counts.items()]
    lines += [f"| **total** | {sum(result.counts.values())} |"]
    if result.existed:
        lines += ["", "Already complete: nothing generated."]
    return "\n".join(lines)


@flow(name="generate-cohort")
def generate_cohort(
    model_uri: str,
    per_class: int | None = None,
    total: int | None = None,
    ratios: str | None = None,
    sampler: Literal["auto", "ddpm", "ddim", "rflow"] = "auto",
    steps: int = 50,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    allow_cpu_fallback: bool = False,
    shard_size: int = 1000,
    name: str | None = None,
    evaluate: bool = True,
    storage_root: str | None = None,
) -> str:
    """Generate a class-balanced synthetic cohort (then evaluate it); returns the cohort URI."""
    logger = get_run_logger()
    spec = CohortSpec(model_uri, per_class, total, ratios, sampler, steps, guidance, seed, batch_size,
                      str(resolve_device(device, allow_cpu_fallback=allow_cpu_fallback)), shard_size, name).check()
    from flows.fanout import generate_fanned_out  # shards over the workers when served, else in-process

    result = generate_fanned_out(spec, storage_root, lambda: generate_task(spec, storage_root), log=logger.info)
    logger.info("%s cohort %s: %s", "found complete" if result.existed else "wrote", result.uri, result.counts)
    create_markdown_artifact(cohort_markdown(result), key=artifact_key("cohort", result.card["cohort_id"]),
                             description="synthetic cohort summary")
    if evaluate:
        from flows.evaluate_cohort import evaluate_cohort_flow

        evaluate_cohort_flow(cohort_uri=result.uri, device=spec.device)
    return result.uri
