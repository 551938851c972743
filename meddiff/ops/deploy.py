"""Apply meddiff's Prefect deployments: create the work pools, then the deployments of prefect.yaml.

Work pools: ``cpu`` (ingest, evaluate) and ``gpu`` (train, generate, pipeline), both of type
``process``; the gpu pool has a concurrency limit so a GPU worker runs one heavy flow at a time.
Everything goes through the ``prefect`` CLI of this interpreter against ``PREFECT_API_URL``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from meddiff.errors import MeddiffError

class DeployError(MeddiffError):
    """The deployments could not be applied."""


@dataclass(frozen=True)
class WorkPoolSpec:
    name: str  # work pool name referenced by prefect.yaml
    type: str = "process"  # worker type: flows run as subprocesses of the worker
    concurrency_limit: int | None = None  # max concurrent flow runs in the pool; None = unlimited


@dataclass(frozen=True)
class DeployConfig:
    prefect_file: str = "prefect.yaml"  # the deployments to apply: the project's, in the current folder
    api_url: str | None = None  # Prefect API; None = $PREFECT_API_URL (must be set: no ephemeral server)
    names: tuple[str, ...] = ()  # 'flow-name/deployment-name' to apply; empty = all of them
    gpu_concurrency: int = 1  # concurrent flow runs on the gpu pool (one GPU per worker)
    cpu_concurrency: int | None = None  # concurrent flow runs on the cpu pool; None = unlimited

    def pools(self) -> tuple[WorkPoolSpec, ...]:
        return (WorkPoolSpec("cpu", concurrency_limit=self.cpu_concurrency),
                WorkPoolSpec("gpu", concurrency_limit=self.gpu_concurrency))

    def check(self) -> "DeployConfig":
        if not (self.api_url or os.environ.get("PREFECT_API_URL")):
            raise DeployError("PREFECT_API_URL is not set: start a server (`docker compose up -d` or "
                              "`prefect server start`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
        if not Path(self.prefect_file).is_file():
            raise DeployError(f"no {self.prefect_file} in {Path.cwd()}: run `meddiff deploy` in the meddiff project "
                              "folder (the repository checkout), or pass --file PATH/prefect.yaml")
        for limit in (self.gpu_concurrency, self.cpu_concurrency):
            if limit is not None and limit < 1:
                raise DeployError(f"work pool concurrency limits must be positive, got {limit}")
        return self


@dataclass(frozen=True)
class DeployResult:
    api_url: str
    pools: tuple[WorkPoolSpec, ...]
    deployments: tuple[str, ...]  # the deployment names applied


def deployment_entries(prefect_file: str | Path) -> list[dict]:
    """The ``deployments`` entries of a prefect.yaml."""
    doc = yaml.safe_load(Path(prefect_file).read_text())
    return list(doc.get("deployments") or [])


def flow_name(entrypoint: str, root: Path) -> str:
    """The Prefect flow name of ``path/file.py:function`` (its ``@flow(name=...)``, else Prefect's default:
    the function name with '-' for '_'), read from the source without importing it."""
    path, _, fn = entrypoint.partition(":")
    if not (root / path).is_file():  # prefect deploy names the missing file itself
        return fn.replace("_", "-")
    tree = ast.parse((root / path).read_text(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == fn:
            for dec in node.decorator_list:
                for kw in dec.keywords if isinstance(dec, ast.Call) else ():
                    if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                        return str(kw.value.value)
    return fn.replace("_", "-")


def deployment_names(prefect_file: str | Path) -> list[str]:
    """'flow-name/deployment-name' of every deployment in a prefect.yaml."""
    root = Path(prefect_file).resolve().parent
    return [f"{flow_name(d['entrypoint'], root)}/{d['name']}" for d in deployment_entries(prefect_file)]


def check_names(names: tuple[str, ...], prefect_file: str | Path) -> None:
    """Refuse a --name that is not a deployment of ``prefect_file`` (prefect's own answer, after the
    pools were changed, was "An entrypoint must be provided")."""
    if not names:
        return
    known = deployment_names(prefect_file)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DeployError(f"no deployment {', '.join(map(repr, unknown))} in {prefect_file}; give --name as "
                          f"flow/deployment, one of: {', '.join(known)}")


def check_api(api_url: str) -> None:
    """Refuse an API that cannot be reached (the prefect CLI's answer was a 40-line httpx traceback).
    Only a connection failure is refused: an HTTP error status (e.g. an auth-only /health) is left to the CLI."""
    import httpx

    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=10)
    except httpx.TransportError as e:
        raise DeployError(f"cannot reach the Prefect API at {api_url} ({e or type(e).__name__}): start the server "
                          "(`docker compose up -d`, `prefect server start` or `meddiff dev-stack start`) or fix "
                          "PREFECT_API_URL / --api-url") from None


def _prefect(args: list[str], env: dict[str, str], cwd: Path, what: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise DeployError(f"{what} failed (prefect {' '.join(args)}, exit {proc.returncode}):\n{out.strip()[-3000:]}")
    return out


def deploy(cfg: DeployConfig, log=print) -> DeployResult:
    """Create/update the work pools, then apply the deployments (all, or ``cfg.names``)."""
    cfg = cfg.check()
    env = dict(os.environ)
    if cfg.api_url:
        env["PREFECT_API_URL"] = cfg.api_url
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["COLUMNS"] = "240"  # keep the CLI's boxed messages on one line each
    prefect_file = Path(cfg.prefect_file).resolve()
    cwd = prefect_file.parent  # entrypoints are relative to the project root
    check_names(cfg.names, prefect_file)  # both before the first change on the server
    check_api(env["PREFECT_API_URL"])
    for pool in cfg.pools():
        _prefect(["work-pool", "create", pool.name, "--type", pool.type, "--overwrite"], env, cwd,
                 f"creating work pool {pool.name}")
        if pool.concurrency_limit is None:
            _prefect(["work-pool", "clear-concurrency-limit", pool.name], env, cwd,
                     f"clearing the concurrency limit of {pool.name}")
        else:
            _prefect(["work-pool", "set-concurrency-limit", pool.name, str(pool.concurrency_limit)], env, cwd,
                     f"setting the concurrency limit of {pool.name}")
        log(f"work pool {pool.name} ({pool.type}, concurrency limit {pool.concurrency_limit or 'none'})")
    selection = [a for n in cfg.names for a in ("--name", n)] or ["--all"]
    out = _prefect(["deploy", *selection, "--prefect-file", str(prefect_file)], env, cwd, "prefect deploy")
    applied = tuple(re.findall(r"Deployment '([^']+)' successfully", out))
    for name in applied:
        log(f"deployment {name}")
    from meddiff.ops.automations import WEBHOOK_ENV, alert_config_from_env, apply_automations

    alerts = alert_config_from_env()  # failure notifications (issue 14): only when a webhook is configured
    if alerts:
        log(f"failure alerts to {alerts.webhook_url} for {', '.join(apply_automations(alerts, env['PREFECT_API_URL']))}")
    else:
        log(f"failure alerts off: set {WEBHOOK_ENV} to a webhook URL and re-run to enable them")
    return DeployResult(env["PREFECT_API_URL"], cfg.pools(), applied)
