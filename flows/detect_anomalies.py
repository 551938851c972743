"""Prefect flow ``detect-anomalies``: the same parameters as ``meddiff anomaly``; one task scores the
split, then an AUROC table artifact."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import LoggedProgress, artifact_key, retry_transient
from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies as run_detection


_D = AnomalyConfig("")  # the library's defaults: the flow restates them (tests/test_flow_defaults.py)


@task(name="score-anomalies", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def score_task(model_uri: str, dataset_uri: str | None, cfg: AnomalyConfig, storage_root: str | None) -> dict:
    logged = LoggedProgress(get_run_logger(), "anomaly", " reconstructions")  # two per image with the ratio score
    return run_detection(model_uri, dataset_uri, cfg, storage_root, logged)


@flow(name="detect-anomalies")
def detect_anomalies(
    model_uri: str,
    normal: str,
    dataset_uri: str | None = None,
    split: Literal["train", "val", "test"] = _D.split,
    level: float = _D.level,
    steps: int = _D.steps,
    guidance: float = _D.guidance,
    max_images: int | None = _D.max_images,
    device: str = _D.device,
    seed: int = _D.seed,
    storage_root: str | None = None,
    batch_size: int = _D.batch_size,
    heatmaps: int = _D.heatmaps,
) -> str:
    """Anomaly scores of a real split against a model of the ``normal`` class; returns the result folder.

    Args:
        model_uri: A model trained on (or conditioned on) the normal class (the train-model run's result).
        normal: The normal class (name or 0-based id); every other class is an anomaly.
        dataset_uri: The real dataset version to score; empty = the one the model was trained on.
        split: The real split scored.
        level: Noise level in (0, 1]: the fraction of the diffusion chain each image is noised to.
        steps: Deterministic denoising steps back from the noise level.
        guidance: Conditional models: classifier-free guidance scale toward the normal class (1 = plain).
        max_images: Seeded subsample of the split (CPU budget); empty = all.
        device: auto (a GPU when the worker has one, else CPU), cpu, cuda or cuda:N.
        seed: Noise and subsample seed.
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
        batch_size: Images per forward pass.
        heatmaps: Most anomalous images shown in heatmaps.png.
    """
    cfg = AnomalyConfig(normal, split, level, steps, guidance, max_images, batch_size, heatmaps, device, seed).check()
    rec = score_task(model_uri, dataset_uri, cfg, storage_root)
    rows = [{"score": s, "anomalies": scope, "auroc": round(r["auroc"], 4),
             "ci": None if r["ci"] is None else [round(c, 4) for c in r["ci"]],
             "n_anomalous": r["n_anomalous"], "n_normal": r["n_normal"]}
            for s, per in rec["auroc"].items() for scope, r in per.items()]
    create_table_artifact(rows, key=artifact_key("anomaly", rec["uri"].rsplit("/", 1)[-1]),
                          description=f"AUROC. {rec['notes']}")  # which scores are label-free
    get_run_logger().info("anomaly scores in %s", rec["uri"])
    return rec["uri"]
