"""The production topology on one machine without Docker (``meddiff dev-stack start|stop|status``).

PostgreSQL → a Prefect server on it → a SeaweedFS S3 server → ``meddiff deploy`` (pools and
deployments) → process workers: ``gpu_workers`` on the gpu pool (worker k sees GPU k via
``CUDA_VISIBLE_DEVICES`` when GPUs exist) and ``cpu_workers`` on the cpu pool. Every service binds
127.0.0.1 on a free port. ``start`` writes ``state.json`` (pids, the environment to export);
``stop`` ends exactly those processes. Tests use :func:`running_stack`, which always stops.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from meddiff.ops.services import (DevStackError, Service, free_port, kill_group, missing_binaries, new_secret,
                                  start_postgres, start_prefect_server, start_weed, start_worker)


@dataclass(frozen=True)
class DevStackConfig:
    state_dir: str = "~/.cache/meddiff/dev-stack"  # state.json, logs, S3 data, Prefect home
    gpu_workers: int = 2  # process workers on the gpu pool (one per GPU in production)
    cpu_workers: int = 1  # process workers on the cpu pool
    worker_limit: int = 2  # flow runs at once per gpu worker: a waiting parent + one shard or part
    gpus: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES of gpu worker k; () = "k" when GPUs exist, else unset
    bucket: str = "meddiff"  # S3 bucket; MEDDIFF_STORAGE = s3://<bucket>/meddiff
    poll_s: int = 10  # worker polling interval in seconds (Prefect's default)
    ui: bool = True  # serve Prefect's UI (tests turn it off: a faster start)
    deploy: bool = True  # apply prefect.yaml (pools + deployments) once the server is up
    deployments: tuple[str, ...] = ()  # 'flow/deployment' names to apply; () = all of prefect.yaml

    def check(self) -> "DevStackConfig":
        for name, least in (("gpu_workers", 0), ("cpu_workers", 0), ("worker_limit", 1), ("poll_s", 1)):
            if getattr(self, name) < least:  # "<field> must ...": the CLI names its option (meddiff.cli.in_flags)
                raise DevStackError(f"{name} must be ≥ {least}, not {getattr(self, name)}")
        if self.gpus and len(self.gpus) != self.gpu_workers:
            raise DevStackError(f"--gpus names {len(self.gpus)} devices for {self.gpu_workers} gpu workers")
        from meddiff.ops.deploy import DeployConfig

        prefect_file = DeployConfig().prefect_file
        if self.deploy and not Path(prefect_file).is_file():  # before any service starts, not after (27 s here)
            raise DevStackError(f"no {prefect_file} in {Path.cwd()}: run `meddiff dev-stack start` in the meddiff "
                                "project folder (the repository checkout), or pass --no-deploy to start the "
                                "services without deployments")
        missing = missing_binaries()
        if missing:
            raise DevStackError("cannot start the dev stack, missing: " + "; ".join(missing))
        return self

    @property
    def home(self) -> Path:
        return Path(self.state_dir).expanduser().resolve()


@dataclass
class StackState:
    """What ``start`` started: read by ``stop``/``status``; ``env`` is what users export."""

    services: dict[str, dict] = field(default_factory=dict)  # name → Service fields (pid, log, stop_signal)
    env: dict[str, str] = field(default_factory=dict)  # PREFECT_API_URL, MEDDIFF_STORAGE, AWS_*
    pg_dir: str = ""  # Postgres cluster folder (kept between starts; under /tmp when run as root)
    pg_password: str = ""
    s3_keys: tuple[str, str] = ("", "")


def _state_path(cfg: DevStackConfig) -> Path:
    return cfg.home / "state.json"


def read_state(cfg: DevStackConfig) -> StackState | None:
    p = _state_path(cfg)
    return StackState(**json.loads(p.read_text())) if p.exists() else None


def _save(cfg: DevStackConfig, state: StackState) -> None:
    p = _state_path(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.chmod(0o600)  # it holds the database password and S3 keys
    os.replace(tmp, p)


def _pg_dir(cfg: DevStackConfig, old: StackState | None) -> Path:
    """The Postgres cluster folder: the previous one, else a new one the postgres user can reach."""
    if old and old.pg_dir and Path(old.pg_dir, "data", "PG_VERSION").exists():
        return Path(old.pg_dir)
    if os.geteuid() == 0:  # root's home is closed to the postgres user
        return Path(tempfile.mkdtemp(prefix="meddiff-dev-stack-pg-"))
    return cfg.home / "postgres"


def gpu_env(cfg: DevStackConfig, k: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES of gpu worker k: one GPU per worker."""
    if cfg.gpus:
        return {"CUDA_VISIBLE_DEVICES": cfg.gpus[k]}
    from meddiff.devices import cuda_count

    n = cuda_count()
    return {"CUDA_VISIBLE_DEVICES": str(k % n)} if n else {}


def start(cfg: DevStackConfig, log: Callable[[str], None] = print) -> StackState:
    """Start every service (stopping what a previous start left running first); returns the state."""
    cfg = cfg.check()
    old = read_state(cfg)
    if old and old.services:
        stop(cfg, log)
    state = StackState(pg_dir=str(_pg_dir(cfg, old)), pg_password=(old and old.pg_password) or new_secret(),
                       s3_keys=tuple(old.s3_keys) if old and old.s3_keys[0] else (new_secret(), new_secret()))
    logs, home = cfg.home / "logs", cfg.home / "prefect-home"
    try:
        _start_services(cfg, state, logs, home, log)
    except BaseException:
        stop_state(state, log)
        if not (old and old.pg_dir == state.pg_dir):
            shutil.rmtree(state.pg_dir, ignore_errors=True)  # a cluster made by this failed start
        raise
    _save(cfg, state)
    return state


def _add(state: StackState, svc: Service, log: Callable[[str], None]) -> Service:
    state.services[svc.name] = {"pid": svc.pid, "log": svc.log, "stop_signal": int(svc.stop_signal)}
    log(f"{svc.name}: pid {svc.pid}, log {svc.log}")
    return svc


def _start_services(cfg: DevStackConfig, state: StackState, logs: Path, home: Path, log: Callable[[str], None]):
    pg = _add(state, start_postgres(Path(state.pg_dir), free_port(), state.pg_password, logs), log)
    s3 = _add(state, start_weed(cfg.home / "s3", logs, cfg.bucket, *state.s3_keys), log)
    server = _add(state, start_prefect_server(pg.env, home, logs, cfg.ui), log)
    state.env = {**server.env, **s3.env, "MEDDIFF_STORAGE": f"s3://{cfg.bucket}/meddiff",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if cfg.deploy:
        from meddiff.ops.deploy import DeployConfig, deploy

        # pool limits off: each worker's --limit bounds its runs (a fanning-out parent holds one slot)
        deploy(DeployConfig(api_url=server.env["PREFECT_API_URL"], names=cfg.deployments, gpu_concurrency=None),
               log=log)
    worker_env = {**state.env, "MEDDIFF_REPO": str(Path(__file__).resolve().parents[2])}
    for k in range(cfg.gpu_workers):
        _add(state, start_worker(f"gpu-{k}", "gpu", worker_env, home, logs, cfg.worker_limit, cfg.poll_s,
                                 gpu_env(cfg, k)), log)
    for k in range(cfg.cpu_workers):
        _add(state, start_worker(f"cpu-{k}", "cpu", worker_env, home, logs, cfg.worker_limit, cfg.poll_s), log)


def stop_state(state: StackState, log: Callable[[str], None] = print) -> None:
    """End every service of ``state``, workers first, Postgres last."""
    for name, svc in reversed(list(state.services.items())):
        kill_group(int(svc["pid"]), int(svc["stop_signal"]))
        log(f"stopped {name} (pid {svc['pid']})")
    state.services.clear()


def stop(cfg: DevStackConfig, log: Callable[[str], None] = print) -> None:
    """Stop what ``start`` started (the Postgres data and S3 data stay for the next start)."""
    state = read_state(cfg)
    if state is None or not state.services:
        log("dev stack: nothing running")
        return
    stop_state(state, log)
    _save(cfg, state)


def status(cfg: DevStackConfig) -> dict[str, bool]:
    """Service name → whether its process is alive."""
    state = read_state(cfg)
    out = {}
    for name, svc in (state.services if state else {}).items():
        try:
            os.killpg(int(svc["pid"]), 0)
            out[name] = True
        except (ProcessLookupError, PermissionError):
            out[name] = False
    return out


@contextmanager
def running_stack(cfg: DevStackConfig, log: Callable[[str], None] = lambda s: None) -> Iterator[StackState]:
    """The whole stack for the length of a ``with`` block; every service stopped, and the Postgres
    cluster deleted, in ``finally`` (tests: nothing is left behind)."""
    state = start(cfg, log)
    try:
        yield state
    finally:
        stop(cfg, log)
        shutil.rmtree(state.pg_dir, ignore_errors=True)
