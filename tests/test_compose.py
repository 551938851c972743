"""Static checks of docker-compose.yml, the Dockerfile, .env.example and prefect.yaml.

No Docker engine in CI: the compose file is parsed and checked structurally (and with
`docker compose config` where the compose plugin exists); prefect.yaml's entrypoints are
imported and their flows' parameter schemas checked against the deployments' defaults.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SERVICES = {"postgres", "prefect-server", "minio", "minio-init", "worker-cpu", "worker-gpu"}
FLOWS = {"ingest-dataset", "train-model", "generate-cohort", "evaluate-cohort", "pipeline", "train-autoencoder",
         "generate-shard", "train-part"}
DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def env_map(service: dict) -> dict:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_compose_services_and_healthchecks(compose):
    services = compose["services"]
    assert SERVICES <= set(services)
    for name, svc in services.items():
        if name != "minio-init":  # a one-shot job: it exits once the bucket exists
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(services["minio-init"]["command"])
    server_env = env_map(services["prefect-server"])
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_ports_bound_to_localhost_only(compose):
    published = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert published, "the server and MinIO publish ports"
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_compose_workers_share_s3_storage_and_gpu_reservation(compose):
    services = compose["services"]
    for name, pool in (("worker-cpu", "cpu"), ("worker-gpu", "gpu")):
        svc = services[name]
        assert svc["build"]["context"] == "."
        cmd = " ".join(svc["command"])
        assert f"--pool {pool}" in cmd and "--type process" in cmd
        env = env_map(svc)
        assert env["MEDDIFF_STORAGE"].startswith("s3://")
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MEDDIFF_REPO"] == "/app"  # prefect.yaml's pull step
        assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in services["worker-cpu"]


def test_compose_credentials_come_from_env_file(compose):
    text = (REPO / "docker-compose.yml").read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert referenced <= set(example), f"missing from .env.example: {referenced - set(example)}"
    for svc in compose["services"].values():
        for key, value in env_map(svc).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert str(value).startswith("${"), f"{key} is hard-coded"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored"


def test_dockerfile_builds_the_project():
    text = (REPO / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11" in text
    for needed in ("COPY meddiff", "COPY flows", "COPY prefect.yaml", "MEDDIFF_REPO=/app", "TORCH_INDEX_URL"):
        assert needed in text
    assert ".venv" in (REPO / ".dockerignore").read_text()


def test_docker_compose_config_when_available():
    if not shutil.which("docker") or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker compose plugin not installed")
    proc = subprocess.run(["docker", "compose", "--env-file", ".env.example", "config", "--quiet"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_prefect_yaml_deployments_pools_and_schedule(prefect_yaml):
    from meddiff.ops.deploy import DeployConfig

    deployments = prefect_yaml["deployments"]
    pools = {p.name: p for p in DeployConfig().pools()}
    by_file = {d["entrypoint"].split(":")[0]: d for d in deployments}
    for path in ("flows/ingest_dataset.py", "flows/train_model.py", "flows/generate_cohort.py",
                 "flows/evaluate_cohort.py", "flows/pipeline.py"):
        assert path in by_file
    expected_pool = {"ingest_dataset": "cpu", "evaluate_cohort": "cpu", "train_model": "gpu",
                     "generate_cohort": "gpu", "pipeline": "gpu", "train_autoencoder": "gpu", "generate_shard": "gpu",
                     "train_part": "gpu"}
    for d in deployments:
        stem = Path(d["entrypoint"].split(":")[0]).stem
        assert d["work_pool"]["name"] == expected_pool[stem] and d["work_pool"]["name"] in pools
    assert pools["gpu"].concurrency_limit == 1 and pools["gpu"].type == pools["cpu"].type == "process"
    nightly = [d for d in deployments if d["name"] == "nightly"]
    assert len(nightly) == 1 and nightly[0]["entrypoint"] == "flows/pipeline.py:pipeline"
    crons = [s["cron"] for s in nightly[0]["schedules"]]
    assert len(crons) == 1 and len(crons[0].split()) == 5
    # issue 17: the worker's own MEDDIFF_REPO, read when the run starts (not templated at deploy time)
    assert prefect_yaml["pull"] == [{"meddiff.ops.pull.worker_repo": {"variable": "MEDDIFF_REPO"}}]
    assert "{{" not in (REPO / "prefect.yaml").read_text()
    from meddiff.ops.pull import worker_repo

    assert worker_repo.__name__ == "worker_repo"  # importable on the worker


def test_pull_step_reads_the_workers_environment(monkeypatch, tmp_path):
    from meddiff.errors import MeddiffError
    from meddiff.ops.pull import worker_repo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDDIFF_REPO", str(REPO))
    assert worker_repo() == {"directory": str(REPO.resolve())} and Path.cwd() == REPO.resolve()
    monkeypatch.setenv("MEDDIFF_REPO", str(tmp_path))
    with pytest.raises(MeddiffError, match="MEDDIFF_REPO=.* holds no flows/ folder"):
        worker_repo()


def test_sqlalchemy_pinned_below_2_1():
    """prefect 3.8.8's scheduler fails on SQLAlchemy 2.1 (no scheduled run ever): pinned, in the image too."""
    from importlib.metadata import version

    text = (REPO / "pyproject.toml").read_text()
    assert '"sqlalchemy>=2.0,<2.1"' in text and "'sqlalchemy>=2.0,<2.1'" in (REPO / "Dockerfile").read_text()
    assert tuple(int(x) for x in version("sqlalchemy").split(".")[:2]) < (2, 1), version("sqlalchemy")


@pytest.mark.parametrize("d", DEPLOYMENTS, ids=[f"{Path(d['entrypoint']).stem}-{d['name']}" for d in DEPLOYMENTS])
def test_prefect_yaml_entrypoints_name_real_flows(d):
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    path, func = d["entrypoint"].split(":")
    if not (REPO / path).is_file():
        pytest.skip(f"{path} not in this checkout yet")
    flow = load_flow_from_entrypoint(str(REPO / d["entrypoint"]), use_placeholder_flow=False)
    assert isinstance(flow, Flow) and flow.name in FLOWS, f"{d['entrypoint']} is not a meddiff flow"
    schema = parameter_schema(flow)
    unknown = set(d.get("parameters") or {}) - set(schema.properties)
    assert not unknown, f"{flow.name}/{d['name']} sets parameters its flow does not take: {unknown}"
    for name, prop in schema.properties.items():  # typed parameters: the server can validate runs
        assert prop.get("type") or prop.get("anyOf") or prop.get("allOf") or prop.get("$ref") or prop.get("enum"), \
            f"{flow.name}.{name} has no type hint"
