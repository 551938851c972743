"""Prefect flow ``generate-cohort``: the same parameters as ``meddiff generate``, meant for a GPU pool.

Runs ``evaluate-cohort`` at the end unless ``evaluate=False``.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import (required, RESULT_OPTIONS, artifact_key, dataset_tag, explain_wait, link_url, LoggedProgress,
                          one_traceback_per_failure, phrased, prefect_progress, publish_link, retry_transient,
                          tag_run, user_errors)
from meddiff.devices import resolve_device
from meddiff.generate import CohortResult, CohortSpec, generate
from meddiff.models.samplers import Sampler
from meddiff.progress import combine

_D = CohortSpec("")  # the library's defaults: the flow restates them (tests/test_flow_defaults.py)
SamplerChoice = Literal[("auto", *Sampler.__args__)]  # type: ignore[valid-type]  (a choice list in the UI)


def run_name() -> str:
    """``generate-<model run id>``."""
    from prefect.runtime import flow_run

    return f"generate-{flow_run.parameters['model_uri'].rstrip('/').rsplit('/', 1)[-1]}"


@task(name="generate", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient)
@phrased
def generate_task(spec: CohortSpec, storage_root: str | None) -> CohortResult:
    progress = combine(prefect_progress(f"generate from {spec.model_uri}"),
                       LoggedProgress(get_run_logger(), "generate", " images"))
    return generate(spec, storage_root, progress)


def cohort_markdown(result: CohortResult) -> str:
    c = result.card
    lines = [f"# Cohort `{c['cohort_id']}`", "", f"URI: [{result.uri}]({link_url(result.uri)})", "",
             f"Model: [{c['model_uri']}]({link_url(c['model_uri'])}) ({c['model_mode']}); sampler {c['sampler']} × "
             f"{c['steps']} steps, guidance {c['guidance_scale']}, seed {c['seed']}, device {c['device']}", "",
             "| class | images |", "|---|---:|"]
    lines += [f"| {name} | {n} |" for name, n in result.counts.items()]
    lines += [f"| **total** | {sum(result.counts.values())} |"]
    if result.existed:
        lines += ["", "Already complete: nothing generated."]
    return "\n".join(lines)


@flow(name="generate-cohort", flow_run_name=run_name, **RESULT_OPTIONS)
def generate_cohort(
    model_uri: str,
    per_class: int | None = _D.per_class,
    total: int | None = _D.total,
    ratios: str | None = _D.ratios,
    sampler: SamplerChoice = _D.sampler,
    steps: int | None = _D.steps,
    guidance: float | None = _D.guidance,
    seed: int = _D.seed,
    batch_size: int = _D.batch_size,
    device: str = _D.device,
    allow_cpu_fallback: bool = False,
    shard_size: int = _D.shard_size,
    name: str | None = _D.name,
    unconditional: bool = _D.unconditional,
    evaluate: bool = True,
    storage_root: str | None = None,
) -> str:
    """Generate a class-balanced synthetic cohort (then evaluate it); returns the cohort URI (the run's persisted result).

    Args:
        model_uri: A trained model (the train-model run's result), e.g. storage/models/<run-id>.
        per_class: Images of every class (give this or total).
        total: Total images, split evenly over the classes or by ratios (give this or per_class).
        ratios: Prevalence ratios of total, "name=p,...": every class named (relative weights), or shares summing
            to 1 (unlisted classes get 0).
        sampler: auto = the measured best for what the model predicts (dpmpp2m for v-prediction DDPM, ddim for ε, heun for rectified flow).
        steps: Reverse-diffusion steps per image; empty = the sampler's measured default (ddim 50, ddpm 100, others 25).
        guidance: Classifier-free guidance scale (conditional models); empty = 2.0.
        seed: Base seed; every image's seed derives from it and its sample id.
        batch_size: Images per forward pass (recorded: it can move an image's last bits).
        device: auto (a GPU when the worker has one, else CPU), cpu, cuda or cuda:N.
        allow_cpu_fallback: With device=cuda on a worker without a GPU: run on the CPU instead of failing.
        shard_size: Images per shard (the resumable chunk).
        name: Cohort id; empty = <model run>-<content hash of the spec>.
        unconditional: Conditional models trained with label dropout: sample through the null label, no class asked
            (needs total; the manifest's class is "(unknown)", the evaluation records the oracle's class).
        evaluate: Run evaluate-cohort on the new cohort (its quality report, with the pipeline's evaluation settings).
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
    """
    one_traceback_per_failure()
    explain_wait()
    logger = get_run_logger()
    tag_run(dataset_tag(model_uri))
    with user_errors():
        required(model_uri, "model_uri", "train-model")
        dev = resolve_device(device, allow_cpu_fallback=allow_cpu_fallback, fallback_switch="allow_cpu_fallback")
        spec = CohortSpec(model_uri, per_class, total, ratios, sampler, steps, guidance, seed, batch_size, str(dev),
                          shard_size, name, unconditional).check()
        from flows.fanout import generate_fanned_out  # shards over the workers when served, else in-process

        result = generate_fanned_out(spec, storage_root, lambda: generate_task(spec, storage_root), log=logger.info)
    logger.info("%s cohort %s: %s", "found complete" if result.existed else "wrote", result.uri, result.counts)
    create_markdown_artifact(cohort_markdown(result), key=artifact_key("cohort", result.card["cohort_id"]),
                             description="synthetic cohort summary")
    publish_link("cohort", result.uri, result.card["cohort_id"], target=f"{result.uri}/cohort.json")
    if evaluate:
        from flows.evaluate_cohort import evaluate_cohort_flow
        from meddiff.pipeline import PipelineConfig

        p = PipelineConfig()  # the pipeline's evaluation: pipeline/default then finds this report up to date
        evaluate_cohort_flow(cohort_uri=result.uri, features=",".join(p.resolved_eval_features()),
                             max_images=p.eval_max_images, device=spec.device)
    logger.info("result: %s", result.uri)
    return result.uri
