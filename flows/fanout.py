"""Fan work out over the workers of a Prefect server: cohort shards (one ``generate-shard`` run each) and
per-class training parts (one ``train-part`` run each).

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
PART_DEPLOYMENT = "train-part/default"  # the deployment every per-class training part runs on
ENV_SWITCH = "MEDDIFF_FANOUT"  # "off": never fan out (e.g. while debugging a worker); anything else: auto


@dataclass(frozen=True)
class FanoutConfig:
    deployment: str = SHARD_DEPLOYMENT  # 'flow/deployment' of the child flow (shards; PART_DEPLOYMENT: training)
    attempts: int = 3  # runs per shard before the cohort fails (a failed run is re-submitted: any worker)
    poll_s: float = 5.0  # how often the parent reads its shard runs' states
    job_variables: dict | None = None  # passed to every shard run (e.g. {"env": {...}}); None = the pool's


class ShardFailed(MeddiffError):
    """A child flow run (shard or class part) failed on every attempt."""


def shard_parameters(spec: CohortSpec, k: int, storage_root: str | None, cohort_id: str) -> dict:
    """The ``generate-shard`` parameters of shard ``k``: the whole spec, the shard index, the root, and
    the cohort they must plan (the shard refuses another)."""
    return {**asdict(spec), "shard": k, "storage_root": storage_root, "cohort_id": cohort_id}


def fan_out_reason(deployment: str) -> str | None:
    """None when this flow run can hand work to ``deployment``'s workers; else why it cannot."""
    if os.environ.get(ENV_SWITCH, "").lower() == "off":
        return f"{ENV_SWITCH}=off"
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None:
        return "not running from a deployment (no workers to fan out to)"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except Exception as e:  # noqa: BLE001 - ObjectNotFound and friends
            return f"no {deployment} deployment on this server (run `meddiff deploy`): {type(e).__name__}: {e}"
        if dep.work_pool_name:
            pool = client.read_work_pool(dep.work_pool_name)
            if pool.concurrency_limit is not None and pool.concurrency_limit < 2:
                return (f"work pool {pool.name} has a concurrency limit of {pool.concurrency_limit}: this run "
                        "holds it, so child runs could never start (raise it: meddiff deploy --gpu-concurrency 3)")
    return None


def submit(deployment: str, parameters: dict, key: str, attempt: int, run_name: str, job_variables: dict | None):
    """Start one child flow run and return at once (``timeout=0``).

    Attempt 0 uses ``key`` itself, so a retried parent finds its children instead of starting new
    ones; re-submits are keyed by this parent run, so a later parent is not handed an old failed run."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    idem = key if attempt == 0 else f"{key}-{flow_run.id}-retry{attempt}"
    return run_deployment(name=deployment, parameters=parameters, timeout=0, idempotency_key=idem,
                          flow_run_name=run_name, job_variables=job_variables, as_subflow=True)


def wait_for_runs(runs: dict, resubmit: Callable[[object, int], object], done: Callable[[object], bool],
                  cfg: FanoutConfig, what: str, log: Callable[[str], None]) -> None:
    """Poll child runs until each completed with its output committed (``done(k)``); re-submit failed or
    crashed ones (and completed ones whose output is missing) up to ``cfg.attempts`` runs each."""
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
                    raise ShardFailed(f"{what} {k} ended {state.name} {tries[k]} times; see its flow run "
                                      "logs, fix the cause and re-run (finished parts are kept)")
                log(f"{what} {k} ended {state.name}; re-submitting (attempt {tries[k] + 1} of {cfg.attempts})")
                pending[k] = resubmit(k, tries[k])
                tries[k] += 1


def generate_fanned_out(spec: CohortSpec, storage_root: str | None, run_in_process: Callable[[], CohortResult],
                        cfg: FanoutConfig = FanoutConfig(), log: Callable[[str], None] = print) -> CohortResult:
    """The cohort of ``spec``: shards fanned out over the workers when possible, else ``run_in_process()``."""
    reason = fan_out_reason(cfg.deployment)
    if reason is not None:
        log(f"generating every shard in this flow run: {reason}")
        return run_in_process()
    from meddiff.generate import finish_cohort, plan_cohort

    t0 = time.time()
    plan = plan_cohort(spec, storage_root)
    if isinstance(plan, CohortResult):
        return plan
    todo = [k for k in range(len(plan.shard_names)) if not plan.shard_done(k)]
    if len(todo) < 2:  # one shard: a child run would only add its overhead
        log(f"cohort {plan.cohort_id}: {len(todo)} shard to generate; generating it in this flow run")
        return run_in_process()
    log(f"cohort {plan.cohort_id}: {len(plan.shard_names)} shards, {len(todo)} to generate on "
        f"{cfg.deployment} workers")

    def start(k: int, attempt: int):
        return submit(cfg.deployment, shard_parameters(spec, k, storage_root, plan.cohort_id), f"{plan.cohort_id}-{k}",
                      attempt, f"{plan.cohort_id}-shard-{k}", cfg.job_variables)

    wait_for_runs({k: start(k, 0) for k in todo}, start, plan.shard_done, cfg, "shard", log)
    generated = sum(len(plan.shard_ids(k)) for k in todo)
    return finish_cohort(plan, generated, time.time() - t0)


def train_parts_fanned_out(params: dict, run_id: str, parts: list[int], part_done: Callable[[int], bool],
                           cfg: FanoutConfig, log: Callable[[str], None] = print) -> bool:
    """Per-class training: one ``train-part`` run per unfinished class on the gpu pool's workers (each
    worker's own GPU). False (nothing started) when this run cannot fan out; the caller trains in-process."""
    reason = fan_out_reason(cfg.deployment)
    if reason is not None:
        log(f"training the class parts in this flow run: {reason}")
        return False
    todo = [c for c in parts if not part_done(c)]
    log(f"model {run_id}: {len(parts)} class parts, {len(todo)} to train on {cfg.deployment} workers")

    def start(c: int, attempt: int):
        return submit(cfg.deployment, {**params, "class_id": c}, f"{run_id}-class-{c}", attempt,
                      f"{run_id}-class-{c}", cfg.job_variables)

    wait_for_runs({c: start(c, 0) for c in todo}, start, part_done, cfg, "class part", log)
    return True
