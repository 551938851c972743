"""Prefect flow ``evaluate-cohort``: the same parameters as ``meddiff evaluate``.

The run logger says what the evaluation is doing (the domain classifier is trained once per
dataset version and cached: the slow part of a first evaluation on a CPU).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import (required, RESULT_OPTIONS, artifact_key, dataset_tag, explain_wait, link_url, LoggedProgress,
                          one_traceback_per_failure, phrased, prefect_progress, publish_link, retry_transient,
                          tag_run, user_errors)
from meddiff import storage
from meddiff.evaluate import EvalConfig, EvalResult, evaluate_cohort as run_evaluation, headline_rows, per_class_table
from meddiff.evaluate.config import TstrProtocol
from meddiff.progress import combine

_D = EvalConfig()  # the library's defaults: the flow restates them (tests/test_flow_defaults.py)


def run_name() -> str:
    """``evaluate-<cohort id>``."""
    from prefect.runtime import flow_run

    return f"evaluate-{flow_run.parameters['cohort_uri'].rstrip('/').rsplit('/', 1)[-1]}"


def describe_plan(cohort_uri: str, cfg: EvalConfig) -> str:
    """One line saying what the evaluation will spend its time on."""
    from meddiff.data.cohorts import open_cohort
    from meddiff.evaluate.features import domain_cache_uri
    from meddiff.evaluate.report import real_dataset_uri

    try:
        dataset_uri = real_dataset_uri(open_cohort(cohort_uri), cfg)
        cached = storage.exists(domain_cache_uri(dataset_uri, cfg.domain, cfg.cache_root))
    except Exception:  # noqa: BLE001 - the evaluation itself reports a bad cohort, with its own message
        return f"evaluating {cohort_uri}"
    domain = ("domain classifier: cached" if cached else
              f"training the domain classifier ({cfg.domain.steps} steps, once per dataset version; cached after)")
    return (f"evaluating {cohort_uri} against {dataset_uri}: loading images, {domain}, features "
            f"({', '.join(cfg.features)}; ≤ {cfg.max_images or 'all'} images per set), metrics with bootstrap CIs, "
            f"{'TSTR trainings, ' if cfg.tstr else ''}report")


@task(name="evaluate", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
@phrased
def evaluate_task(cohort_uri: str, cfg: EvalConfig, force: bool) -> EvalResult:
    logger = get_run_logger()
    logger.info(describe_plan(cohort_uri, cfg))
    logged = LoggedProgress(logger, "evaluate", " stages", even=False)  # unequal stages: no rate or ETA
    progress = combine(prefect_progress(f"evaluate {cohort_uri}"), logged)
    return run_evaluation(cohort_uri, cfg, progress, force=force)


def summary_markdown(result: EvalResult) -> str:
    r = result.report
    cohort, dataset = r["inputs"]["cohort_uri"], r["inputs"]["dataset_uri"]
    lines = ["# Cohort evaluation", "", f"Cohort: [{cohort}]({link_url(cohort)}) ({r['cohort']['n']} images)",
             f"Real dataset: [{dataset}]({link_url(dataset)})", "",
             f"Report: [{result.html_uri}]({link_url(result.html_uri)})", "",
             f"**{r['verdict']['sentence']}**", "",
             "| metric | synthetic [95 % CI] | real baseline (val) [95 % CI] | n | verdict |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in headline_rows(r)]
    if r["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in r["warnings"][:20]]
    return "\n".join(lines)


def full_rows(rows: list[dict]) -> list[dict]:
    """Every row with every column (None where a class lacks a metric): the UI takes its columns from
    the rows, so a first row missing a metric would hide that column for all."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in columns} for r in rows]


@flow(name="evaluate-cohort", flow_run_name=run_name, **RESULT_OPTIONS)
def evaluate_cohort_flow(
    cohort_uri: str,
    real_uri: str | None = _D.real_uri,
    features: str = ",".join(_D.features),
    tstr: bool = _D.tstr,
    tstr_protocol: TstrProtocol = _D.tstr_protocol,
    tstr_steps: int = _D.tstr_steps,
    tstr_max_images: int | None = _D.tstr_max_images,
    drop_flagged: bool = _D.drop_flagged,
    max_images: int | None = _D.max_images,
    device: str = _D.device,
    force: bool = False,
    umap_points: int = _D.umap_points,
) -> str:
    """Evaluate a synthetic cohort; returns the report.json URI (the run's persisted result).

    Args:
        cohort_uri: A generated cohort (the generate-cohort run's result), e.g. storage/cohorts/<cohort-id>.
        real_uri: Real dataset version to compare with; empty = the cohort's own dataset.
        features: Feature extractors, comma-separated: inception and/or domain (inception needs the extra `inception`).
        tstr: Train on synthetic, test on real: four classifier trainings (real, real at the synthetic
            n, synthetic, both; minutes on a CPU).
        tstr_protocol: fair (equal optimizer steps for real / synthetic / real+synthetic, checkpoint chosen on
            real val) or medmnist (the MedMNIST v2 ResNet-18 recipe, for GPU runs).
        tstr_steps: Optimizer steps per TSTR training (fair protocol).
        tstr_max_images: Cap on each TSTR training set (seeded subsample); empty = all.
        drop_flagged: Consumers (and TSTR) skip memorization-flagged images by default.
        max_images: Images per set (synthetic/train/val) through Inception; empty = all.
        device: auto (a GPU when the worker has one, else CPU), cpu, cuda or cuda:N.
        force: Recompute even when an up-to-date report exists.
        umap_points: Real and synthetic points in the report's UMAP (0 = none).
    """
    one_traceback_per_failure()
    explain_wait()
    logger = get_run_logger()
    tag_run(dataset_tag(cohort_uri))
    with user_errors():
        required(cohort_uri, "cohort_uri", "generate-cohort")
        cfg = EvalConfig(real_uri=real_uri, features=tuple(f.strip() for f in features.split(",") if f.strip()),
                         tstr=tstr, tstr_protocol=tstr_protocol, tstr_steps=tstr_steps,
                         tstr_max_images=tstr_max_images, drop_flagged=drop_flagged, max_images=max_images,
                         device=device, umap_points=umap_points).check()
        result = evaluate_task(cohort_uri, cfg, force)
    logger.info("%s report %s", "found up-to-date" if result.existed else "wrote", result.report_uri)
    name = cohort_uri.rstrip("/").rsplit("/", 1)[-1]
    create_markdown_artifact(summary_markdown(result), key=artifact_key("evaluation", name),
                             description="cohort evaluation summary")
    table = full_rows(per_class_table(result.report))
    create_table_artifact(table, key=artifact_key("evaluation", name, "per-class"),
                          description=f"per-class metrics (synthetic): {', '.join(table[0]) if table else ''}")
    publish_link("report", result.html_uri, name)
    logger.info("result: %s", result.report_uri)
    return result.report_uri


evaluate_cohort = evaluate_cohort_flow  # the entrypoint name prefect.yaml uses
