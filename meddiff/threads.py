"""Thread pools that fit the machine: size torch's CPU pools from the CPUs this process may really use.

Two problems on a small shared machine (issue 16): torch starts one OpenMP thread per core whether or
not other processes already use those cores, and GNU OpenMP (torch's CPU wheels ship libgomp) then
*spin-waits* at every parallel-region barrier, so a thread whose partner was descheduled burns its
time slice waiting. Both are fixed here:

* :func:`quiet_wait_policy` sets ``OMP_WAIT_POLICY=PASSIVE`` (libgomp: spin count 0, threads sleep at
  barriers; ``KMP_BLOCKTIME=0`` is the Intel-OpenMP spelling) *before torch loads libgomp*, which
  reads it once, at load time — but only when other processes already keep CPUs busy (a 0.1 s look
  at ``/proc/stat``): on a quiet machine sleeping threads cost 20–70 % (measured: bench_busy, 2
  threads), so OpenMP's default spin stays. ``import meddiff`` calls it, so every entry point (CLI,
  ``python -m meddiff.train``, flows, bench scripts) gets it; a value the user set is kept. A
  competitor that starts after this process did meets spinning threads (then ``--threads 1``).
* :func:`configure_threads` sets ``torch.set_num_threads`` to the CPUs left free: the CPUs in this
  process's affinity mask, capped by a cgroup CPU quota, minus what other processes are using right
  now (measured from ``/proc/stat`` over a short window, our own CPU time subtracted; the 1-minute
  load average where ``/proc/stat`` is unreadable), never below 1.

Precedence: an explicit request (``--threads``/``cpu_threads``, or ``MEDDIFF_THREADS``) wins, then
``OMP_NUM_THREADS`` (torch already honours it: left alone), then the automatic size.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WAIT_POLICY_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}  # libgomp / Intel OpenMP
THREADS_ENV = "MEDDIFF_THREADS"  # explicit thread count for every stage (the CLI's --threads sets it)
TUNING_ENV = "MEDDIFF_THREAD_TUNING"  # "off": torch's own defaults, no wait policy (bench_busy's "before")
SAMPLE_WINDOW_S = 0.2  # how long /proc/stat is watched to see how busy the CPUs are
IMPORT_WINDOW_S = 0.1  # the same look at import time (every process pays it once)
BUSY_AT_START = 0.5  # CPUs kept busy by other processes at import from which OpenMP threads sleep at barriers


def quiet_wait_policy(busy: float | None = None) -> bool:
    """On CPUs other processes already use, make OpenMP threads sleep, not spin, at barriers; on a quiet
    machine keep OpenMP's default. Must run before ``import torch``. ``busy``: CPUs in use by others
    (default: measured now). Returns whether the sleeping policy was set."""
    if tuning_off() or "torch" in sys.modules:  # off, or too late: libgomp read its policy when torch loaded
        return False
    if os.environ.get("OMP_WAIT_POLICY") is None:
        busy = others_busy(IMPORT_WINDOW_S) if busy is None else busy
        if busy < BUSY_AT_START:
            return False
    for k, v in WAIT_POLICY_ENV.items():  # a value the user set is kept
        os.environ.setdefault(k, v)
    return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"


def tuning_off() -> bool:
    return os.environ.get(TUNING_ENV, "").lower() in ("off", "0", "false", "no")


def affinity_cpus() -> list[int]:
    """CPU ids this process may run on (``sched_getaffinity``; all CPUs where that is unsupported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota/period``); None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> float:
    """CPUs this process may use at most: its affinity mask, capped by a cgroup quota."""
    n = float(len(affinity_cpus()))
    quota = cgroup_quota()
    return min(n, quota) if quota else n


def _cpu_jiffies(cpus: list[int]) -> tuple[int, int]:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat (busy excludes idle and iowait)."""
    busy = total = 0
    wanted = {f"cpu{i}" for i in cpus}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name in wanted:
            v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(v)
            busy += sum(v) - v[3] - v[4]
    return busy, total


def others_busy(window_s: float = SAMPLE_WINDOW_S) -> float:
    """CPUs (of our affinity set) that *other* processes kept busy during the last ``window_s`` seconds."""
    cpus = affinity_cpus()
    try:
        b0, t0 = _cpu_jiffies(cpus)
        own0 = sum(os.times()[:2])
        time.sleep(window_s)
        b1, t1 = _cpu_jiffies(cpus)
        own1 = sum(os.times()[:2])
    except (OSError, ValueError):
        return max(0.0, os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0.0
    if t1 <= t0:
        return 0.0
    busy_cpus = (b1 - b0) / (t1 - t0) * len(cpus)
    own_cpus = (own1 - own0) / window_s
    return max(0.0, busy_cpus - own_cpus)


def auto_threads(local_world: int = 1, busy: float | None = None) -> int:
    """Threads for one of ``local_world`` processes: the free CPUs (rounded to nearest), split among them."""
    busy = others_busy() if busy is None else busy
    free = available_cpus() - busy
    return max(1, math.floor(free / max(1, local_world) + 0.5))


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # intra-op threads torch now uses
    source: str  # "explicit" | "MEDDIFF_THREADS" | "OMP_NUM_THREADS" | "torch default" | "auto"
    available: float  # CPUs in the affinity mask / quota
    busy: float | None  # CPUs other processes used when measured (None: not measured)

    def describe(self) -> str:
        busy = "" if self.busy is None else f", others busy {self.busy:.1f}"
        return f"{self.threads} CPU thread(s) ({self.source}; {self.available:g} CPUs available{busy})"


def plan_threads(requested: int | None = None, local_world: int = 1, load_aware: bool = True) -> ThreadPlan:
    """How many intra-op threads this process should use (see the module docstring for precedence).

    ``load_aware=False`` (generation): the CPUs available (affinity, quota), never the current load, so
    the thread count — which moves CPU kernels' last bits — is a property of the machine, not of the
    moment: a shard made by a fan-out worker equals the one a single process makes."""
    from meddiff.errors import MeddiffError

    avail = available_cpus()
    if requested is None and os.environ.get(THREADS_ENV):
        try:
            requested, source = int(os.environ[THREADS_ENV]), THREADS_ENV
        except ValueError:
            raise MeddiffError(f"{THREADS_ENV} must be a whole number of threads, not {os.environ[THREADS_ENV]!r}")
    else:
        source = "explicit"
    if requested is not None:
        if requested < 1:
            raise MeddiffError(f"threads must be at least 1, not {requested}")
        return ThreadPlan(int(requested), source, avail, None)
    if os.environ.get("OMP_NUM_THREADS") or tuning_off():
        import torch

        return ThreadPlan(torch.get_num_threads(), "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS")
                          else "torch default", avail, None)
    if not load_aware:
        return ThreadPlan(max(1, math.floor(avail / max(1, local_world) + 0.5)), "auto (machine)", avail, None)
    busy = others_busy()
    return ThreadPlan(auto_threads(local_world, busy), "auto", avail, busy)


def oversubscription(threads: int, local_world: int = 1) -> str | None:
    """A warning when an explicit thread count asks for more CPUs than the processes may use (threads
    beyond the CPUs wait for each other at every parallel region: measured on 2 CPUs, training 4 threads
    ran 2.3x and 64 threads ~20x slower than 2); None when they fit."""
    avail = available_cpus()
    if threads * max(1, local_world) <= avail:
        return None
    fit = max(1, math.floor(avail / max(1, local_world)))
    return (f"{threads} CPU threads per process asked for, {avail:g} CPUs available: threads beyond the CPUs "
            f"wait for each other and run several times slower (64 threads on 2 CPUs: ~20x); use at most {fit} "
            "unless you need another machine's thread count to reproduce its weights bit for bit")


def configure_threads(requested: int | None = None, local_world: int = 1, load_aware: bool = True) -> ThreadPlan:
    """Size torch's intra-op pool (and, once per process, its inter-op pool) for this machine now."""
    import torch

    plan = plan_threads(requested, local_world, load_aware)
    if plan.source == "torch default":
        return plan
    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    try:  # inter-op threads serve torch.jit.fork only: one per intra-op thread is plenty; settable once
        torch.set_num_interop_threads(max(1, min(plan.threads, 2)))
    except RuntimeError:
        pass
    return plan
