"""Prefect flow ``sweep``: the same parameters as ``meddiff sweep``; every grid combination is its own
task run (train → generate → evaluate → likelihood; finished runs and cohorts are reused because
they are content-addressed), then a task writes the comparison table (+ a Prefect table artifact)."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import artifact_key, retry_transient
from flows.train_model import PresetName
from meddiff.analysis.sweep import (RankBy, SweepConfig, best_sentence, combinations, finish_sweep, parse_grid,
                                   run_combination, sweep_uri)
from meddiff import storage


_D = SweepConfig("", ())  # the library's defaults: the flow restates them (tests/test_flow_defaults.py)


@task(name="sweep-combination", retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def combination_task(cfg: SweepConfig, combo: dict, storage_root: str | None) -> dict:
    return run_combination(cfg, combo, storage_root)


@task(name="finish-sweep", cache_policy=NO_CACHE)
def finish_task(cfg: SweepConfig, rows: list[dict], storage_root: str | None) -> dict:
    return finish_sweep(cfg, rows, storage_root)


def artifact_rows(rec: dict) -> list[dict]:
    knobs = [n for n, _ in rec["config"]["grid"]]
    cols = ("kid", "fid", "label_fidelity", "ssim_to_nearest_train", "intra_class_ssim", "bits_per_dim")
    return [{**{k: r[k] for k in knobs}, **{c: None if r.get(c) is None else round(float(r[c]), 5) for c in cols}}
            for r in rec["rows"]]


@flow(name="sweep")
def sweep(
    dataset_uri: str,
    grid: list[str],
    mode: Literal["conditional", "per-class"] = "conditional",
    preset: PresetName = "tiny",
    steps: int | None = None,
    batch_size: int | None = None,
    objective: Literal["ddpm", "rflow"] = "ddpm",
    per_class: int = _D.per_class,
    sample_steps: int = _D.sample_steps,
    likelihood_images: int = _D.likelihood_images,
    likelihood_timesteps: int = _D.likelihood_timesteps,
    rank_by: RankBy = _D.rank_by,
    device: str = _D.device,
    seed: int = _D.seed,
    storage_root: str | None = None,
    parallel: bool = False,
    network_channels: list[int] | None = None,
) -> str:
    """Ablation sweep over ``grid`` (e.g. ["schedule=linear,cosine", "attention=none,coarse"]); returns the
    sweep folder. ``parallel=True`` submits the combinations side by side (one machine: they share it).

    Args:
        dataset_uri: An ingested dataset version (the ingest-dataset run's result).
        grid: KNOB=v1,v2 entries: schedule, attention, channels (16-32,32-64), objective, prediction, lr, steps,
            batch_size, preset, mode; every combination is trained, sampled and evaluated.
        mode: conditional or per-class, for every combination (unless the grid varies it).
        preset: Network and training size of every combination (unless the grid varies it).
        steps: Training steps of every combination; empty = the preset's default.
        batch_size: Training batch size of every combination; empty = the preset's default.
        objective: ddpm or rflow (bits/dim is measured for ddpm only).
        per_class: Images generated per class by every model (the same n for every row).
        sample_steps: Sampler steps of generation.
        likelihood_images: Test images of the bits/dim estimate of DDPM models (0 = skip).
        likelihood_timesteps: Stratified timesteps of the bits/dim estimate.
        rank_by: The metric naming the best combination.
        device: auto (a GPU when the worker has one, else CPU), cpu, cuda or cuda:N.
        seed: Seed of every combination.
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
        parallel: Run the combinations side by side (they share this machine) instead of one after another.
        network_channels: U-Net channels per level of every combination, e.g. [16, 32] (unless the grid varies
            channels); empty = the preset's.
    """
    logger = get_run_logger()
    base = {"mode": mode, "preset": preset, "steps": steps, "batch_size": batch_size, "objective": objective}
    if network_channels:  # only when given, as the CLI does: the same request hashes to the same sweep
        base["network_channels"] = tuple(network_channels)
    cfg = SweepConfig(dataset_uri, parse_grid(grid), base, per_class, sample_steps, likelihood_images,
                      likelihood_timesteps, rank_by, device, seed).check()
    done = storage.join(sweep_uri(cfg, storage_root), "sweep.json")
    if storage.exists(done):
        rec = storage.read_json(done)
        logger.info("found finished sweep %s", rec["uri"])
    else:
        combos = combinations(cfg)
        if parallel:
            futures = [combination_task.submit(cfg, c, storage_root) for c in combos]
            rows = [f.result() for f in futures]
        else:
            rows = [combination_task(cfg, c, storage_root) for c in combos]
        rec = finish_task(cfg, rows, storage_root)
    name = rec["uri"].rstrip("/").rsplit("/", 1)[-1]
    create_table_artifact(artifact_rows(rec), key=artifact_key("sweep", name), description="ablation sweep")
    create_markdown_artifact(f"# Sweep `{name}`\n\n{best_sentence(rec)}\n\nBest model: `{rec['best_model_uri']}`"
                             f"\n\nTable: `{rec['uri']}/sweep.html`",
                             key=artifact_key("sweep", name, "best"), description="best combination")
    logger.info("sweep %s: %s", rec["uri"], best_sentence(rec))
    return rec["uri"]
