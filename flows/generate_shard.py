"""Prefect flow ``generate-shard``: one deterministic shard of a cohort, committed atomically.

``generate-cohort`` starts one run of this flow per missing shard (deployment
``generate-shard/default`` on the gpu pool) and merges the parts when all are done. Sample ids and
seeds come from the cohort spec, so the shard is the same whichever worker makes it; a shard that
is already committed is skipped. For ``s3://`` roots the shard, then its manifest part, are
uploaded to the cohort URI as soon as they are written.
"""

from __future__ import annotations

import os
from pathlib import Path
from prefect import flow, get_run_logger

import meddiff.generate as gen
from flows.generate_cohort import SamplerChoice
from meddiff.errors import MeddiffError
from meddiff.generate import CohortResult, CohortSpec, plan_cohort

SHARD_TIMEOUT_S = 6 * 3600  # a shard is minutes of GPU time; hours means a hung worker


def clean_partial_writes(flow, flow_run, state) -> None:
    """on_failure/on_crashed hook: drop the hidden temp files an interrupted atomic write left behind.

    Committed shards and parts are whole (temp file + rename, part last), so removing ``.*.tmp`` in
    the local work folders leaves storage exactly as consistent as before the run started.
    """
    work = Path.home() / ".cache" / "meddiff" / "work" / "cohorts"
    root = flow_run.parameters.get("storage_root") or os.environ.get("MEDDIFF_STORAGE") or "storage"
    folders = [work] + ([Path(root) / "cohorts"] if "://" not in root else [])
    removed = [p for d in folders if d.is_dir() for p in d.glob("*/**/.*.tmp")]
    for p in removed:
        p.unlink(missing_ok=True)
    get_run_logger().warning("shard run ended %s; removed %d partial temp files", state.name, len(removed))


@flow(name="generate-shard", timeout_seconds=SHARD_TIMEOUT_S, on_failure=[clean_partial_writes],
      on_crashed=[clean_partial_writes])
def generate_shard(  # named like the flow: `prefect deploy --name generate-shard/...` matches it
    model_uri: str,
    shard: int,
    per_class: int | None = None,
    total: int | None = None,
    ratios: str | None = None,
    sampler: SamplerChoice = "auto",
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    shard_size: int = 1000,
    name: str | None = None,
    unconditional: bool = False,
    storage_root: str | None = None,
    cohort_id: str | None = None,
) -> dict:
    """Generate shard ``shard`` of the cohort these parameters describe (skipped when committed).

    generate-cohort starts these runs with its own parameters; they are the cohort's, as in generate-cohort.

    Args:
        model_uri: The cohort's trained model (the train-model run's result).
        shard: Which shard of the cohort this run writes (0-based; the cohort's shard_size images each).
        per_class: Images of every class (give this or total).
        total: Total images, split evenly over the classes or by ratios (give this or per_class).
        ratios: Prevalence ratios of total, "name=p,...".
        sampler: auto = the measured best for what the model predicts; else the cohort's sampler.
        steps: Reverse-diffusion steps per image; empty = the sampler's measured default.
        guidance: Classifier-free guidance scale (conditional models); empty = 2.0.
        seed: Base seed; every image's seed derives from it and its sample id.
        batch_size: Images per forward pass (recorded: it can move an image's last bits).
        device: auto (this worker's GPU when it has one, else CPU), cpu, cuda or cuda:N.
        shard_size: Images per shard (the resumable chunk).
        name: Cohort id; empty = <model run>-<content hash of the spec>.
        unconditional: Sample through the null label, no class asked (needs total).
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
        cohort_id: The parent's cohort, which these parameters must plan (a worker with other meddiff code could
            otherwise write its shard into another cohort); empty = no check.
    """
    logger = get_run_logger()
    spec = CohortSpec(model_uri, per_class, total, ratios, sampler, steps, guidance, seed, batch_size, device,
                      shard_size, name, unconditional).check()
    plan = plan_cohort(spec, storage_root)
    worker = os.environ.get("MEDDIFF_WORKER", "")
    planned = plan.card["cohort_id"] if isinstance(plan, CohortResult) else plan.cohort_id
    if cohort_id is not None and planned != cohort_id:
        raise MeddiffError(f"generate-shard was asked for a shard of {cohort_id} but its parameters plan {planned}: "
                           "this worker's meddiff differs from the parent run's, or the deployment drops a "
                           "parameter; update the workers and re-run `meddiff deploy`")
    if isinstance(plan, CohortResult):
        logger.info("cohort %s is complete; nothing to do", plan.uri)
        return {"cohort_uri": plan.uri, "shard": shard, "generated": False, "worker": worker}
    if not 0 <= shard < len(plan.shard_names):
        raise MeddiffError(f"shard {shard} is out of range: cohort {plan.cohort_id} has {len(plan.shard_names)} shards")
    made = gen.generate_shard(plan, shard)
    logger.info("shard %d of %s: %s on %s (worker %s)", shard, plan.cohort_id, "generated" if made else
                "already committed", plan.device, worker or "?")
    return {"cohort_uri": plan.uri, "shard": shard, "generated": made, "worker": worker}
