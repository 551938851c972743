"""Prefect flow ``evaluate-cohort``: the same parameters as ``meddiff evaluate``."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import artifact_key, prefect_progress, retry_transient
from meddiff.evaluate import EvalConfig, EvalResult, evaluate_cohort as run_evaluation, headline_rows, per_class_table


@task(name="evaluate", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def evaluate_task(cohort_uri: str, cfg: EvalConfig, force: bool) -> EvalResult:
    return run_evaluation(cohort_uri, cfg, prefect_progress(f"evaluate {cohort_uri}"), force=force)


def summary_markdown(result: EvalResult) -> str:
    r = result.report
    lines = ["# Cohort evaluation", "", f"Cohort: `{r['inputs']['cohort_uri']}` ({r['cohort']['n']} images)",
             f"Real dataset: `{r['inputs']['dataset_uri']}`", "", f"Report: `{result.html_uri}`", "",
             f"**{r['verdict']['sentence']}**", "",
             "| metric | synthetic [95 % CI] | real baseline (val, same n) | n | verdict |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in headline_rows(r)]
    if r["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in r["warnings"][:20]]
    return "\n".join(lines)


@flow(name="evaluate-cohort")
def evaluate_cohort_flow(
    cohort_uri: str,
    real_uri: str | None = None,
    features: str = "inception,domain",
    tstr: bool = False,
    tstr_protocol: str = "fair",
    tstr_steps: int = 300,
    tstr_max_images: int | None = None,
    drop_flagged: bool = False,
    max_images: int | None = 1000,
    device: str = "auto",
    force: bool = False,
) -> str:
    """Evaluate a synthetic cohort; returns the report.json URI."""
    logger = get_run_logger()
    cfg = EvalConfig(real_uri=real_uri, features=tuple(f.strip() for f in features.split(",") if f.strip()),
                     tstr=tstr, tstr_protocol=tstr_protocol, tstr_steps=tstr_steps, tstr_max_images=tstr_max_images, drop_flagged=drop_flagged,
                     max_images=max_images, device=device).check()
    result = evaluate_task(cohort_uri, cfg, force)
    logger.info("%s report %s", "found up-to-date" if result.existed else "wrote", result.report_uri)
    name = cohort_uri.rstrip("/").rsplit("/", 1)[-1]
    create_markdown_artifact(summary_markdown(result), key=artifact_key("evaluation", name),
                             description="cohort evaluation summary")
    create_table_artifact(per_class_table(result.report), key=artifact_key("evaluation", name, "per-class"),
                          description="per-class metrics (synthetic)")
    return result.report_uri


evaluate_cohort = evaluate_cohort_flow  # the entrypoint name prefect.yaml uses
