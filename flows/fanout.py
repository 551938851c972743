"""Fan a cohort's shards out over the workers of a Prefect server (one ``generate-shard`` run per shard).

``generate-cohort`` calls :func:`generate_fanned_out`: when it runs from a deployment on a worker and
a ``generate-shard`` deployment exists on a pool that can hold the parent and a child at once, each
missing shard becomes its own flow run (``run_deployment(..., timeout=0)`` with the idempotency key
``<cohort-id>-<k>``, so a retried parent never launches a shard twice), the parent waits for them,
re-submits a failed shard (it lands on any worker) and then merges the parts and writes
``cohort.json`` last. Anywhere else the same shard function runs in-process (``meddiff.generate``).
Shard bytes depend only on the spec, so both ways give byte-identical shards and manifests.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

from meddiff.errors import MeddiffError
from meddiff.generate import CohortResult, CohortSpec

SHARD_DEPLOYMENT = "generate-shard/default"  # the deployment every shard runs on
ENV_SWITCH = "MEDDIFF_FANOUT"  # "off": never fan out (e.g. while debugging a worker); anything else: auto


@dataclass(frozen=True)
class FanoutConfig:
    deployment: str = SHARD_DEPLOYMENT  # 'flow/deployment' of the shard flow
    attempts: int = 3  # runs per shard before the cohort fails (a failed run is re-submitted: any worker)
    poll_s: float = 5.0  # how often the parent reads its shard runs' states
    job_variables: dict | None = None  # passed to every shard run (e.g. {"env": {...}}); None = the pool's


class ShardFailed(MeddiffError):
    """A shard's flow run failed on every attempt."""


def shard_parameters(spec: CohortSpec, k: int, storage_root: str | None) -> dict:
    """The ``generate-shard`` parameters of shard ``k``: the whole spec, the shard index, the root."""
    return {**asdict(spec), "shard": k, "storage_root": storage_root}


def fan_out_reason(spec: CohortSpec, cfg: FanoutConfig) -> str | None:
    """None when shards can go to other workers; else why they run in this process."""
    if os.environ.get(ENV_SWITCH, "").lower() == "off":
        return f"{ENV_SWITCH}=off"
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None:
        return "not running from a deployment (no workers to fan out to)"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(cfg.deployment)
        except Exception:  # noqa: BLE001 - ObjectNotFound and friends
            return f"no {cfg.deployment} deployment on this server (run `meddiff deploy`)"
        if dep.work_pool_name:
            pool = client.read_work_pool(dep.work_pool_name)
            if pool.concurrency_limit is not None and pool.concurrency_limit < 2:
                return (f"work pool {pool.name} has a concurrency limit of {pool.concurrency_limit}: this run "
                        "holds it, so shard runs could never start (raise it, e.g. meddiff deploy --gpu-concurrency 3)")
    return None


def submit_shard(spec: CohortSpec, cohort_id: str, k: int, storage_root: str | None, cfg: FanoutConfig,
                 attempt: int):
    """Start shard ``k``'s flow run and return at once (``timeout=0``); the key makes a re-submit a no-op."""
    from prefect.deployments import run_deployment

    from prefect.runtime import flow_run

    # attempt 0: the key, so a retried parent finds its shard runs instead of starting new ones;
    # re-submits are keyed by this parent run, so a later parent is not handed an old failed run again
    key = f"{cohort_id}-{k}" if attempt == 0 else f"{cohort_id}-{k}-{flow_run.id}-retry{attempt}"
    return run_deployment(name=cfg.deployment, parameters=shard_parameters(spec, k, storage_root), timeout=0,
                          idempotency_key=key, flow_run_name=f"{cohort_id}-shard-{k}",
                          job_variables=cfg.job_variables, as_subflow=True)


def wait_for_shards(spec: CohortSpec, cohort_id: str, runs: dict, storage_root: str | None, cfg: FanoutConfig,
                    done: Callable[[int], bool], log: Callable[[str], None]) -> dict:
    """Poll the shard runs until each completed with its shard committed (``done(k)``); re-submit
    failed/crashed ones (and completed ones whose shard is missing) up to ``cfg.attempts`` runs."""
    from prefect.client.orchestration import get_client

    tries = {k: 1 for k in runs}
    pending = dict(runs)
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(cfg.poll_s)
            for k, run in list(pending.items()):
                state = client.read_flow_run(run.id).state
                if state is None or not state.is_final():
                    continue
                if state.is_completed() and done(k):
                    del pending[k]
                    continue
                if tries[k] >= cfg.attempts:
                    raise ShardFailed(f"shard {k} of cohort {cohort_id} ended {state.name} {tries[k]} times; "
                                      "see its flow run logs, fix the cause and re-run (done shards are kept)")
                log(f"shard {k} ended {state.name}; re-submitting (attempt {tries[k] + 1} of {cfg.attempts})")
                pending[k] = runs[k] = submit_shard(spec, cohort_id, k, storage_root, cfg, tries[k])
                tries[k] += 1
    return runs


def generate_fanned_out(spec: CohortSpec, storage_root: str | None, run_in_process: Callable[[], CohortResult],
                        cfg: FanoutConfig = FanoutConfig(), log: Callable[[str], None] = print) -> CohortResult:
    """The cohort of ``spec``: shards fanned out over the workers when possible, else ``run_in_process()``."""
    reason = fan_out_reason(spec, cfg)
    if reason is not None:
        log(f"generating every shard in this flow run: {reason}")
        return run_in_process()
    from meddiff.generate import finish_cohort, plan_cohort

    t0 = time.time()
    plan = plan_cohort(spec, storage_root)
    if isinstance(plan, CohortResult):
        return plan
    todo = [k for k in range(len(plan.shard_names)) if not plan.shard_done(k)]
    log(f"cohort {plan.cohort_id}: {len(plan.shard_names)} shards, {len(todo)} to generate on "
        f"{cfg.deployment} workers")
    runs = {k: submit_shard(spec, plan.cohort_id, k, storage_root, cfg, 0) for k in todo}
    wait_for_shards(spec, plan.cohort_id, runs, storage_root, cfg, plan.shard_done, log)
    generated = sum(len(plan.shard_ids(k)) for k in todo)
    return finish_cohort(plan, generated, time.time() - t0)
