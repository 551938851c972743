"""Prefect flow ``detect-anomalies``: the same parameters as ``meddiff anomaly``; one task scores the
split, then an AUROC table artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import LoggedProgress, artifact_key, retry_transient
from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies as run_detection


@task(name="score-anomalies", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def score_task(model_uri: str, dataset_uri: str, cfg: AnomalyConfig, storage_root: str | None) -> dict:
    logged = LoggedProgress(get_run_logger(), "anomaly", " reconstructions")  # two per image with the ratio score
    return run_detection(model_uri, dataset_uri, cfg, storage_root, logged)


@flow(name="detect-anomalies")
def detect_anomalies(
    model_uri: str,
    dataset_uri: str,
    normal: str,
    split: str = "test",
    level: float = 0.3,
    steps: int = 10,
    guidance: float = 1.0,
    max_images: int | None = 1000,
    device: str = "auto",
    seed: int = 0,
    storage_root: str | None = None,
) -> str:
    """Anomaly scores of a real split against a model of the ``normal`` class; returns the result folder."""
    cfg = AnomalyConfig(normal, split, level, steps, guidance, max_images, device=device, seed=seed).check()
    rec = score_task(model_uri, dataset_uri, cfg, storage_root)
    rows = [{"score": s, "anomalies": scope, "auroc": round(r["auroc"], 4),
             "ci": None if r["ci"] is None else [round(c, 4) for c in r["ci"]],
             "n_anomalous": r["n_anomalous"], "n_normal": r["n_normal"]}
            for s, per in rec["auroc"].items() for scope, r in per.items()]
    create_table_artifact(rows, key=artifact_key("anomaly", rec["uri"].rsplit("/", 1)[-1]),
                          description=f"AUROC. {rec['notes']}")  # which scores are label-free
    get_run_logger().info("anomaly scores in %s", rec["uri"])
    return rec["uri"]
