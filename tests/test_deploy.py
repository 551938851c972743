"""Deployments through a real Prefect server and real process workers on loopback.

One `prefect server start` (SQLite in a tmp PREFECT_HOME) per module, `meddiff deploy` applied
from prefect.yaml, then real `prefect worker start --type process` subprocesses running
deployments with `prefect deployment run ... --watch`. Every process is started with its own
environment (nothing in this pytest process's os.environ changes) and stopped in teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(api_url: str | None, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_HEARTBEAT_SECONDS="5",
               PREFECT_LOGGING_LEVEL="INFO", COLUMNS="200", **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT/SIGTERM the process group we started, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO):
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server (SQLite) on a free loopback port; yields (api_url, home)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # the scheduler looks for new runs every 5 s (60 s by default), so a short interval fires within a test
    env = prefect_env(None, home, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    log = home / "server.log"
    with process(PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log) as proc:
        wait_healthy(api_url, proc, log)
        yield api_url, home


def deployment_names() -> list[str]:
    """'flow/deployment' for every prefect.yaml entry whose flow file exists in this checkout."""
    from prefect.flows import load_flow_from_entrypoint

    names = []
    for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        path = d["entrypoint"].split(":")[0]
        if (REPO / path).is_file():
            names.append(f"{load_flow_from_entrypoint(str(REPO / d['entrypoint'])).name}/{d['name']}")
    return names


@pytest.fixture(scope="module")
def deployed(server):
    """`meddiff deploy` against the server: work pools and prefect.yaml's deployments."""
    api_url, home = server
    names = deployment_names()
    everything = len(names) == len(yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"])
    cmd = [str(BIN / "meddiff"), "deploy"] + ([] if everything else [a for n in names for a in ("--name", n)])
    proc = run(cmd, prefect_env(api_url, home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for n in names:
        assert f"deployment {n}" in proc.stdout
    return api_url, home, names


@contextmanager
def worker(api_url: str, home: Path, pool: str, *options: str, **extra: str):
    env = prefect_env(api_url, home, MEDDIFF_REPO=str(REPO), **extra)
    log = home / f"worker-{pool}-{time.monotonic_ns()}.log"
    cmd = PREFECT + ["worker", "start", "--pool", pool, "--type", "process", *options]
    with process(cmd, env, log, cwd=home) as proc:
        yield proc, log


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def inspect(api_url: str, home: Path, *args: str) -> str:
    proc = run(PREFECT + [*args], prefect_env(api_url, home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_work_pools_and_schedule_applied(deployed):
    api_url, home, names = deployed
    for pool, limit in (("cpu", None), ("gpu", 1)):
        info = json.loads(inspect(api_url, home, "work-pool", "inspect", pool, "--output", "json"))
        assert info["type"] == "process" and info.get("concurrency_limit") == limit, info
    assert "pipeline/nightly" in names
    nightly = json.loads(inspect(api_url, home, "deployment", "inspect", "pipeline/nightly", "--output", "json"))
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["work_pool_name"] == "gpu" and nightly["enforce_parameter_schema"] is True
    # the code location is read on the worker when a run starts, not templated from the deployer's shell
    assert nightly["pull_steps"] == [{"meddiff.ops.pull.worker_repo": {"variable": "MEDDIFF_REPO"}}]


def test_unknown_and_mistyped_parameters_rejected(deployed):
    api_url, home, _ = deployed
    env = prefect_env(api_url, home)
    before = run(PREFECT + ["flow-run", "ls"], env).stdout.count("ingest-dataset")
    bogus = run(PREFECT + ["deployment", "run", "ingest-dataset/default", "--param", "bogus=1"], env)
    assert bogus.returncode != 0
    assert "bogus" in bogus.stdout + bogus.stderr
    typed = run(PREFECT + ["deployment", "run", "ingest-dataset/default", "--param", 'split_seed="abc"'], env)
    assert typed.returncode != 0
    assert "split_seed" in typed.stdout + typed.stderr and "integer" in typed.stdout + typed.stderr
    after = run(PREFECT + ["flow-run", "ls"], env).stdout.count("ingest-dataset")
    assert after == before  # nothing was scheduled


def test_ingest_deployment_runs_on_cpu_worker(deployed, medmnist_dir, tmp_path):
    api_url, home, _ = deployed
    storage = tmp_path / "storage"
    with worker(api_url, home, "cpu") as (_, log):
        proc = run(PREFECT + ["deployment", "run", "ingest-dataset/default", "--watch",
                              "--param", f"medmnist_root={json.dumps(str(medmnist_dir))}",
                              "--param", f"storage_root={json.dumps(str(storage))}"],
                   prefect_env(api_url, home))
        assert proc.returncode == 0, proc.stdout + proc.stderr + log.read_text()[-3000:]
    cards = list(storage.glob("datasets/bloodmnist/*/dataset.json"))
    assert len(cards) == 1
    card = json.loads(cards[0].read_text())
    assert card["num_classes"] == 8 and card["totals"]["train"] > 10_000


def test_generate_cohort_default_runs_on_gpu_worker(deployed, request, tmp_path):
    api_url, home, names = deployed
    if "generate-cohort/default" not in names:
        pytest.skip("flows/generate_cohort.py not in this checkout yet")
    model_uri = request.getfixturevalue("tiny_conditional_model_uri")
    storage = tmp_path / "storage"
    params = {"model_uri": model_uri, "per_class": 2, "steps": 4, "batch_size": 16, "evaluate": False,
              "storage_root": str(storage)}
    with worker(api_url, home, "gpu") as (_, log):
        proc = run(PREFECT + ["deployment", "run", "generate-cohort/default", "--watch",
                              "--params", json.dumps(params)], prefect_env(api_url, home))
        assert proc.returncode == 0, proc.stdout + proc.stderr + log.read_text()[-3000:]
        if not torch_has_cuda():  # a GPU asked for on a worker without one: the run fails and says so
            cuda = run(PREFECT + ["deployment", "run", "generate-cohort/default", "--watch",
                                  "--params", json.dumps({**params, "device": "cuda"})], prefect_env(api_url, home))
            assert cuda.returncode != 0
            assert "no CUDA GPU" in cuda.stdout + cuda.stderr + log.read_text(), log.read_text()[-3000:]
    records = list(storage.glob("cohorts/*/cohort.json"))
    assert len(records) == 1, sorted(str(p.relative_to(storage)) for p in storage.rglob("*"))[:50]
    from meddiff.data.cohorts import open_cohort

    card = json.loads(records[0].read_text())
    assert card["model_uri"] == model_uri and set(card["counts"].values()) == {2}
    assert (records[0].parent / "manifest.parquet").is_file()
    assert len(open_cohort(str(records[0].parent)).manifest()) == sum(card["counts"].values())


def api(api_url: str, path: str, body: dict | None = None, attempts: int = 3):
    """One call to the server's REST API (retried: a busy 2-core machine can stall SQLite for a while)."""
    req = urllib.request.Request(f"{api_url}/{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except (TimeoutError, ConnectionError):
            if attempt == attempts - 1:
                raise
            time.sleep(5)


def run_log_messages(api_url: str, run_id: str, page: int = 200) -> list[str]:
    """Every log message of one flow run, in time order (the API answers 200 at most per call)."""
    messages: list[str] = []
    while True:
        batch = api(api_url, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}},
                                             "limit": page, "offset": len(messages)})
        messages += [entry["message"] for entry in batch]
        if len(batch) < page:
            return messages


def wait_for_log(api_url: str, run_id: str, text: str, timeout: float = 90) -> list[str]:
    """A run's logs once one message contains `text`. A run's state can reach the server before its last log
    batch (the process ships logs every couple of seconds and at exit), so a finished run's logs are polled."""
    deadline = time.monotonic() + timeout
    while True:
        messages = run_log_messages(api_url, run_id)
        if any(text in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(2)


def deployment_runs(api_url: str, name: str) -> list[dict]:
    dep = api(api_url, f"deployments/name/{name}")
    return api(api_url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})


def test_ingest_deployment_error_names_the_parameter_with_one_traceback(deployed, tmp_path):
    """A deployment user is told about `--param medmnist_root` / the worker's MEDMNIST_ROOT, not a CLI
    flag, and the failure's traceback is logged once (not once by the task and again by the flow)."""
    api_url, home, _ = deployed
    empty = tmp_path / "no-npz-here"
    empty.mkdir()
    with worker(api_url, home, "cpu", MEDDIFF_STORAGE=str(tmp_path / "storage")) as (_, log):
        proc = run(PREFECT + ["deployment", "run", "ingest-dataset/default", "--watch",
                              "--param", f"medmnist_root={json.dumps(str(empty))}"], prefect_env(api_url, home))
    assert proc.returncode != 0, proc.stdout + proc.stderr
    (failed,) = [r for r in deployment_runs(api_url, "ingest-dataset/default")
                 if r["parameters"].get("medmnist_root") == str(empty)]
    logs = "\n".join(wait_for_log(api_url, failed["id"], "medmnist_root parameter"))
    assert "medmnist_root parameter" in logs and "--medmnist-root" not in logs, logs[-3000:]
    assert logs.count("Traceback (most recent call last)") == 1, logs[-6000:]
    assert not list((tmp_path / "storage").rglob("dataset.json"))


def test_interval_schedule_fires_and_a_worker_runs_it(deployed, medmnist_dir, tmp_path):
    """The scheduler of a real server (SQLite) creates runs for a short interval schedule and a real process
    worker runs them, offline: MEDMNIST_ROOT and MEDDIFF_STORAGE come from the worker's environment. Runs are
    named from their parameters, tagged with the dataset, and their result (the URI) is persisted.
    (On SQLAlchemy 2.1 the scheduler fails every loop and no run is ever created.)"""
    api_url, home, _ = deployed
    storage = tmp_path / "storage"
    env = prefect_env(api_url, home)
    created = run(PREFECT + ["deployment", "schedule", "create", "ingest-dataset/default", "--interval", "15"], env)
    assert created.returncode == 0, created.stdout + created.stderr
    try:
        with worker(api_url, home, "cpu", "--limit", "1", MEDMNIST_ROOT=str(medmnist_dir),
                    MEDDIFF_STORAGE=str(storage)) as (_, log):  # one run at a time: a 2-core machine
            deadline = time.monotonic() + 480
            while time.monotonic() < deadline:
                runs = [r for r in deployment_runs(api_url, "ingest-dataset/default") if r["auto_scheduled"]]
                done = [r for r in runs if r["state_type"] == "COMPLETED"]
                failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
                assert not failed, (failed[0]["state"], log.read_text()[-3000:])
                if len(done) >= 2:
                    break
                time.sleep(3)
            else:
                pytest.fail(f"no 2 scheduled runs completed: {[(r['name'], r['state_type']) for r in runs]}\n"
                            f"{(home / 'server.log').read_text()[-3000:]}\n{log.read_text()[-3000:]}")
            # read the runs' logs while the worker (and a run process still shipping its last log batch at
            # exit) lives: stopping the worker first can cut that batch off
            logs = {r["id"]: wait_for_log(api_url, r["id"], "result: ") for r in done[:2]}
    finally:
        run(PREFECT + ["deployment", "schedule", "clear", "ingest-dataset/default", "--accept"], env)
    cards = list(storage.glob("datasets/bloodmnist/*/dataset.json"))
    assert len(cards) == 1  # the second run found the first one's version
    uri = str(cards[0].parent)
    for r in done[:2]:
        assert r["name"] == "ingest-medmnist:bloodmnist" and "dataset:bloodmnist" in r["tags"], r
        messages = logs[r["id"]]
        assert f"result: {uri}" in messages, messages[-20:]
        data = r["state"]["data"] or {}
        stored = Path(data.get("storage_key", ""))
        assert stored.is_file(), r["state"]  # the persisted result (JSON), readable by run_deployment callers
        assert json.loads(stored.read_text()) == uri  # the flow's return value, as JSON
