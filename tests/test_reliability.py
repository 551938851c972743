"""Reliability under load, kills and concurrency (issue 16): thread sizing, artifact locks with two real
processes, concurrent runs of one stage, and a CI-sized chaos run (SIGKILL at random moments)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meddiff import threads
from meddiff.errors import MeddiffError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


# --------------------------------------------------------------------------- threads

def test_wait_policy_sleeps_only_on_busy_cpus(monkeypatch):
    for k in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "MEDDIFF_THREAD_TUNING"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as if torch were not loaded yet (it reads the policy once)
    assert not threads.quiet_wait_policy(busy=0.1) and "OMP_WAIT_POLICY" not in os.environ  # quiet: spin
    assert threads.quiet_wait_policy(busy=1.0) and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["KMP_BLOCKTIME"] == "0"


def test_wait_policy_is_set_before_torch_loads_openmp_and_user_values_win():
    code = ("import os, meddiff, torch; torch.ones(64, 64) @ torch.ones(64, 64); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('KMP_BLOCKTIME'))")
    env = {k: v for k, v in ENV.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "MEDDIFF_THREAD_TUNING")}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:  # every CPU busy: the process that imports meddiff now must get sleeping OpenMP threads
        time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert out.split() == ["PASSIVE", "0"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["ACTIVE", "0"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MEDDIFF_THREAD_TUNING": "off"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "None"]


def test_auto_threads_leave_the_cores_other_processes_use(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2.0)
    assert threads.auto_threads(busy=0.0) == 2
    assert threads.auto_threads(busy=0.3) == 2  # noise is not a competitor
    assert threads.auto_threads(busy=1.0) == 1
    assert threads.auto_threads(busy=3.5) == 1  # never below one
    assert threads.auto_threads(local_world=2, busy=0.0) == 1  # torchrun ranks on one host share the cores
    monkeypatch.setattr(threads, "available_cpus", lambda: 8.0)
    assert threads.auto_threads(busy=2.2) == 6


def test_cgroup_quota_caps_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None
    assert threads.cgroup_quota(tmp_path / "absent") is None


def test_others_busy_sees_a_cpu_bound_competitor_and_not_ourselves():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert threads.others_busy(0.5) >= 0.6
    finally:
        hog.kill()
        hog.wait()


def test_explicit_threads_win_over_the_environment_and_auto(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MEDDIFF_THREADS", "1")
        assert threads.configure_threads(2).threads == 2 and torch.get_num_threads() == 2  # --cpu-threads
        plan = threads.configure_threads()
        assert (plan.source, plan.threads, torch.get_num_threads()) == ("MEDDIFF_THREADS", 1, 1)
        monkeypatch.setenv("MEDDIFF_THREADS", "two")
        with pytest.raises(MeddiffError, match="MEDDIFF_THREADS must be a whole number"):
            threads.plan_threads()
        monkeypatch.delenv("MEDDIFF_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.plan_threads().source == "OMP_NUM_THREADS"
        monkeypatch.delenv("OMP_NUM_THREADS")
        plan = threads.plan_threads()
        assert plan.source == "auto" and 1 <= plan.threads <= len(os.sched_getaffinity(0)) and plan.busy is not None
    finally:
        torch.set_num_threads(before)


def test_more_threads_than_cpus_is_warned_about(monkeypatch, tmp_path):
    """MEDDIFF_THREADS=64 (e.g. copied from a bigger machine) trained 5 BreastMNIST steps at 7 images/s
    instead of 135 on this 2-CPU machine, without a word; the CLI now warns (and still obeys)."""
    from typer.testing import CliRunner

    from meddiff.cli import app

    cpus = threads.available_cpus()
    assert cpus < 1 or threads.oversubscription(int(cpus)) is None  # (a CPU quota can be under one CPU)
    too_many = int(cpus) + 1
    said = threads.oversubscription(too_many)
    assert f"{too_many} CPU threads per process asked for, {cpus:g} CPUs available" in said
    assert threads.oversubscription(1, local_world=too_many) is not None  # ranks on one host share the CPUs
    monkeypatch.setenv("MEDDIFF_THREADS", "1")  # restored after the test: the CLI's --threads sets it
    runner, env = CliRunner(), {"MEDDIFF_STORAGE": str(tmp_path)}
    for args, extra in ((["--threads", str(too_many)], {}), ([], {"MEDDIFF_THREADS": str(too_many)})):
        out = runner.invoke(app, [*args, "datasets", "list"], env={**env, **extra})
        assert f"warning: {too_many} CPU threads per process" in out.output and "use at most" in out.output
    quiet = runner.invoke(app, ["--threads", "1", "datasets", "list"], env=env)
    assert "warning" not in quiet.output


class _Sized(Exception):
    """Raised where a stage sizes torch's thread pool (its work has not started yet)."""


@pytest.mark.parametrize("stage", ["train-autoencoder", "encode", "likelihood", "anomaly", "calibrate"])
def test_every_cpu_heavy_stage_sizes_its_thread_pool(stage, breastmnist_uri, tiny_per_class_model_uri, tmp_path,
                                                     monkeypatch):
    """Only train, generate and evaluate sized torch's pool: train-autoencoder, encode, likelihood, anomaly
    and calibrate ran on torch's default (a thread per core however busy the machine) and ignored
    ``meddiff --threads 1``. Each now sizes it (here to MEDDIFF_THREADS=1) before its work starts."""
    import torch

    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies
    from meddiff.evaluate.calibrate import calibrate
    from meddiff.evaluate.reconstruction import encode_with_report
    from meddiff.models.likelihood import LikelihoodConfig, likelihood
    from meddiff.train.ae_config import AETrainConfig
    from meddiff.train.autoencoder import train_autoencoder

    root, model = str(tmp_path), tiny_per_class_model_uri
    ae = AETrainConfig(breastmnist_uri, kind="vae", steps=2, batch_size=8, adv_warmup_steps=1, device="cpu")
    ae_uri = train_autoencoder(ae, root).uri if stage == "encode" else None
    runs = {"train-autoencoder": lambda: train_autoencoder(ae, root),
            "encode": lambda: encode_with_report(breastmnist_uri, ae_uri, "cpu", 40, root),
            "likelihood": lambda: likelihood(model, breastmnist_uri, LikelihoodConfig(max_images=4, timesteps=2,
                                                                                      device="cpu", seed=9)),
            "anomaly": lambda: detect_anomalies(model, breastmnist_uri, AnomalyConfig(
                "normal, benign", steps=2, max_images=12, device="cpu"), root),
            "calibrate": lambda: calibrate(breastmnist_uri, root=root)}
    before, set_threads = torch.get_num_threads(), torch.set_num_threads
    set_threads(2)  # torch's default on this 2-core machine: sizing to 1 must change it

    def sized(n: int) -> None:
        raise _Sized(n)

    monkeypatch.setenv("MEDDIFF_THREADS", "1")  # what `meddiff --threads 1 <command>` sets
    monkeypatch.setattr(torch, "set_num_threads", sized)
    try:
        with pytest.raises(_Sized) as sizing:
            runs[stage]()
    finally:
        monkeypatch.undo()
        set_threads(before)
    assert sizing.value.args == (1,)


# --------------------------------------------------------------------------- locks with real processes

_HOLD = """
import json, sys, time
from meddiff.locks import artifact_lock
uri, hold_s, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with artifact_lock(uri, on_wait=lambda owner: print("waiting for", owner.get("pid"), flush=True)):
    print("acquired", flush=True)
    t0 = time.time()
    time.sleep(hold_s)
    with open(log, "a") as f:
        f.write(json.dumps([t0, time.time()]) + "\\n")
"""


def _holder(uri: str, hold_s: float, log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOLD, uri, str(hold_s), str(log)], stdout=subprocess.PIPE,
                            text=True, env=env or ENV, cwd=REPO)


def _lock_semantics(uri: str, tmp_path: Path, env=None) -> None:
    log = tmp_path / "log.jsonl"
    a = _holder(uri, 10.0, log, env)  # long enough for B to start (imports) while A holds it
    assert a.stdout.readline().strip() == "acquired"
    b = _holder(uri, 0.1, log, env)
    assert b.stdout.readline().startswith("waiting for")  # B sees A's lock and waits
    assert a.wait(60) == 0 and b.wait(60) == 0
    (a0, a1), (b0, b1) = [json.loads(x) for x in log.read_text().splitlines()]
    assert b0 >= a1  # B held it only after A let go
    # a holder killed with SIGKILL leaves no stale lock behind
    k = _holder(uri, 60.0, log, env)
    assert k.stdout.readline().strip() == "acquired"
    k.send_signal(signal.SIGKILL)
    k.wait()
    c = _holder(uri, 0.0, log, env)
    assert c.wait(60) == 0 and "acquired" in c.stdout.read()


def test_artifact_lock_local_two_processes_and_a_killed_owner(tmp_path):
    root = tmp_path / "root"
    _lock_semantics(str(root / "cohorts" / "c1"), tmp_path)
    assert not any(root.rglob("*.lock"))  # released locks are removed, killed ones taken over and removed


def test_artifact_lock_s3_two_processes_and_a_killed_owner(tmp_path, moto_s3):
    env = {**ENV, **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                 "AWS_DEFAULT_REGION")}}
    _lock_semantics("s3://meddiff/lock-test/cohorts/c1", tmp_path, env)
    import boto3

    keys = boto3.client("s3").list_objects_v2(Bucket="meddiff", Prefix="lock-test/").get("KeyCount", 0)
    assert keys == 0


def test_a_builder_waiting_on_another_says_who_holds_the_artifact(breastmnist_uri, medmnist_dir, tmp_path):
    """A second `meddiff ingest/train/generate/evaluate` of the same artifact used to wait without a word."""
    from meddiff.data.ingest import IngestConfig, ingest
    from told import Told

    root = tmp_path / "root"
    uri = str(root / Path(breastmnist_uri).relative_to(Path(breastmnist_uri).parents[2]))  # same version, new root
    holder = _holder(uri, 3.0, tmp_path / "log.jsonl")
    assert holder.stdout.readline().strip() == "acquired"
    told = Told()
    result = ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)), str(root), told)
    assert holder.wait(60) == 0 and result.uri == uri and not result.existed
    assert len(told) == 1 and re.fullmatch(
        rf"another process \(pid {holder.pid} on {re.escape(os.uname().nodename)}, for \d+ s\) is building "
        rf"{re.escape(uri)}: waiting for it to finish, then going on \(Ctrl-C stops waiting\)", told[0]), told


def test_ctrl_c_while_waiting_on_another_builder_says_nothing_changed(breastmnist_uri, medmnist_dir, tmp_path):
    root = tmp_path / "root"
    uri = str(root / Path(breastmnist_uri).relative_to(Path(breastmnist_uri).parents[2]))
    holder = _holder(uri, 60.0, tmp_path / "log.jsonl")
    try:
        assert holder.stdout.readline().strip() == "acquired"
        proc = subprocess.Popen([str(Path(sys.executable).with_name("meddiff")), "ingest", "medmnist:breastmnist",
                                 "--medmnist-root", str(medmnist_dir), "--storage", str(root)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        line = ""
        while "is building" not in line:  # it waits, and says on whom
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "ingest ended without waiting"
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        holder.kill()
    assert proc.returncode == 130, err[-1500:]
    assert err.strip().splitlines()[-1] == (f"interrupted: stopped waiting for the other process building {uri}; "
                                            "this run changed nothing: re-run the same command to wait again")
    assert not Path(uri).exists() and not list((root / ".staging").glob("*"))


def test_lists_tell_a_run_in_progress_from_a_stopped_one(tmp_path):
    """`models list` and `cohorts list` called every unfinished run "incomplete (resumable)", the one being
    trained or generated right now by another process as well."""
    from typer.testing import CliRunner

    from meddiff.cli import app

    root = tmp_path / "root"
    for kind, name in (("models", "m-run"), ("cohorts", "c-run")):
        (root / kind / name).mkdir(parents=True)  # unfinished: no model.json / cohort.json
        holder = _holder(str(root / kind / name), 60.0, tmp_path / "log.jsonl")
        try:
            assert holder.stdout.readline().strip() == "acquired"
            live = CliRunner().invoke(app, [kind, "list", "--storage", str(root)], terminal_width=300)
        finally:
            holder.kill()
            holder.wait()
        assert live.exit_code == 0 and f"in progress now (pid {holder.pid} on {os.uname().nodename})" in live.output
        stopped = CliRunner().invoke(app, [kind, "list", "--storage", str(root)], terminal_width=300)
        assert "incomplete (resumable)" in stopped.output and "in progress" not in stopped.output, stopped.output


def test_a_damaged_record_is_one_row_of_a_listing_not_the_end_of_it(breastmnist_uri, tiny_conditional_model_uri,
                                                                      tmp_path):
    """One corrupt dataset.json or cohort.json stopped `datasets list` / `cohorts list` with an error that
    hid every other artifact; a corrupt model.json made `models list` a JSON traceback, a corrupt
    report.json `cohorts list` and `cohorts show` too. Each is now its row, with a warning naming the file."""
    import shutil

    from typer.testing import CliRunner

    from meddiff.cli import app
    from meddiff.generate import CohortSpec, generate

    root = tmp_path / "root"
    version = Path(breastmnist_uri).name
    for name in ("good", "bad"):
        shutil.copytree(breastmnist_uri, root / "datasets" / name / version)
        shutil.copytree(tiny_conditional_model_uri, root / "models" / name)
    cohort = Path(generate(CohortSpec(str(root / "models" / "good"), per_class=1, steps=2, device="cpu"),
                           str(root)).uri)
    shutil.copytree(cohort, root / "cohorts" / "bad")
    shutil.copytree(cohort, root / "cohorts" / "bad-report")
    (root / "cohorts" / "bad-report" / "report.json").write_text("{")
    for kind, record in (("datasets", f"bad/{version}/dataset.json"), ("models", "bad/model.json"),
                         ("cohorts", "bad/cohort.json")):
        (root / kind / record).write_text("{")
        listed = CliRunner().invoke(app, [kind, "list", "--storage", str(root)], terminal_width=400)
        assert listed.exit_code == 0, listed.output
        assert f"warning: {root / kind / record} is corrupt" in listed.output
        rows = [line for line in listed.output.splitlines() if line.startswith("│")]
        assert len(rows) == (3 if kind == "cohorts" else 2) and sum("unreadable (see below)" in r for r in rows) == \
            (2 if kind == "cohorts" else 1), listed.output
        assert any("good" in r or "complete" in r for r in rows if "unreadable" not in r)
    shown = CliRunner().invoke(app, ["cohorts", "show", str(root / "cohorts" / "bad-report")], terminal_width=400)
    assert shown.exit_code == 0 and "report: unreadable: " in shown.output and "report.json is corrupt" in shown.output


def test_lock_holder_on_s3_is_the_live_owner_only(tmp_path, moto_s3):
    from meddiff.locks import lock_holder

    env = {**ENV, **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                 "AWS_DEFAULT_REGION")}}
    uri = "s3://meddiff/holder-test/cohorts/c1"
    assert lock_holder(uri) is None
    holder = _holder(uri, 60.0, tmp_path / "log.jsonl", env)
    try:
        assert holder.stdout.readline().strip() == "acquired"
        assert lock_holder(uri)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(uri) is None  # its lock object stays until taken over, but its process is gone


# --------------------------------------------------------------------------- two processes, one stage

_GENERATE = """
import json, sys
from meddiff.generate import CohortSpec, generate
r = generate(CohortSpec(sys.argv[1], per_class=6, steps=10, device="cpu", shard_size=8), sys.argv[2])
print(json.dumps({"uri": r.uri, "existed": r.existed}))
"""


def test_two_processes_generating_the_same_cohort_share_the_work(tiny_conditional_model_uri, tmp_path):
    from meddiff.data.cohorts import verify

    root = tmp_path / "root"
    procs = [subprocess.Popen([sys.executable, "-c", _GENERATE, tiny_conditional_model_uri, str(root)],
                              stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0]["uri"] == outs[1]["uri"]
    assert sorted(o["existed"] for o in outs) == [False, True]  # one generated, the other waited and found it
    assert verify(outs[0]["uri"]).ok
    hidden = [p for p in root.rglob("*") if any(s.startswith(".") for s in p.relative_to(root).parts) and p.is_file()]
    assert hidden == []
    # ... and equals a single run in a fresh root, shard for shard
    alone = tmp_path / "alone"
    out = subprocess.run([sys.executable, "-c", _GENERATE, tiny_conditional_model_uri, str(alone)], env=ENV, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    single = Path(json.loads(out.strip().splitlines()[-1])["uri"])
    shared = Path(outs[0]["uri"])
    tars = sorted(p.name for p in single.glob("*.tar"))
    assert tars and tars == sorted(p.name for p in shared.glob("*.tar"))
    assert all((single / t).read_bytes() == (shared / t).read_bytes() for t in tars)


def test_two_processes_training_the_same_autoencoder_share_the_work(breastmnist_uri, tmp_path):
    """train-autoencoder took no lock: two identical runs trained side by side in one run folder, both
    appending to its metrics.jsonl and both writing its checkpoints and model card."""
    from meddiff.models.autoencoders import load_autoencoder
    from meddiff.train.records import read_metrics

    args = [str(Path(sys.executable).with_name("meddiff")), "train-autoencoder", breastmnist_uri, "--kind", "vae",
            "--steps", "150", "--batch-size", "16", "--log-every", "5", "--checkpoint-every", "50",
            "--device", "cpu", "--storage", str(tmp_path / "root")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    uris = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(uris) == 1
    assert sum("autoencoder already trained; nothing to do" in err for _, err in outs) == 1  # the other trained it
    run = Path(uris.pop())
    assert [r["step"] for r in read_metrics(run)] == list(range(5, 151, 5))  # one writer: no row twice
    assert load_autoencoder(str(run), "cpu").card["steps"] == 150  # its weights match the card's sha256


def test_two_processes_encoding_the_same_latents_share_the_work(medmnist_dir, tmp_path):
    """encode took no lock: two identical runs both computed the reconstruction report and wrote every
    latent shard into the same folder (harmless bytes, twice the work); now one waits, then reuses them."""
    from meddiff.data.ingest import IngestConfig, ingest
    from meddiff.train.ae_config import AETrainConfig
    from meddiff.train.autoencoder import train_autoencoder

    root = str(tmp_path / "root")
    ds = ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)), root).uri
    ae = train_autoencoder(AETrainConfig(ds, kind="vae", steps=4, batch_size=8, adv_warmup_steps=2,
                                         device="cpu"), root).uri
    args = [str(Path(sys.executable).with_name("meddiff")), "encode", ds, ae, "--max-images", "40",
            "--device", "cpu", "--storage", root]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1  # the same latents
    errs = "".join(err for _, err in outs)
    assert errs.count("encoding every split into latent shards") == 1, errs  # one process did the work
    assert errs.count("this dataset was encoded with this autoencoder before") == 1  # the other reused it
    assert errs.count("reconstruction of 40 val images: PSNR") == 2  # both say how well the AE reconstructs


# --------------------------------------------------------------------------- chaos, CI-sized

@pytest.mark.slow
def test_chaos_every_stage_survives_sigkill_at_random_moments(medmnist_dir, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import chaos
    finally:
        sys.path.remove(str(REPO / "bench"))
    results = chaos.main(["--medmnist-root", str(medmnist_dir), "--trials", "2", "--backends", "local",
                          "--scratch", str(tmp_path), "--seed", "1"])
    table = results["local"]
    assert set(table) == set(chaos.STAGES)
    assert all(ok == n == 2 for ok, n, _ in table.values()), table
    assert sum(killed for _, _, killed in table.values()) >= 3  # kills really landed mid-work (most of the 10)


def test_a_killed_writers_temp_files_and_staging_are_swept_by_the_next_writer(tmp_path):
    from meddiff import storage

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f".card.json.{dead.pid}.k3j2.tmp").write_bytes(b"half")
    alive = tmp_path / f".card.json.{os.getpid()}.zz.tmp"  # a live writer's (ours): kept
    alive.write_bytes(b"in progress")
    storage.write_bytes(str(tmp_path / "card.json"), b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["card.json", alive.name])
    stale = tmp_path / ".staging" / f"dataset-x-v1-{dead.pid}-abcd"
    (stale / "sub").mkdir(parents=True)
    fresh = storage.local_staging(str(tmp_path), "dataset-x-v1")
    assert not stale.exists() and fresh.is_dir() and fresh.name.startswith(f"dataset-x-v1-{os.getpid()}-")


def test_s3_run_killed_while_publishing_its_checkpoint_resumes_from_its_own(moto_s3, tmp_path, monkeypatch):
    """Chaos find (S3): a run killed while pushing its final checkpoint left a newer checkpoint locally
    than on S3; the re-run must keep the local metrics that match it (it used to pull S3's older
    metrics.jsonl over them, and the published run ended its metrics 10 steps early)."""
    import json as _json

    from meddiff import storage
    from meddiff.train.run_folder import RunFolder

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = RunFolder.for_uri("s3://meddiff/models/run-x")
    rows = lambda n: "".join(_json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5, n + 1, 5))  # noqa: E731
    storage.write_bytes(storage.join(folder.uri, "metrics.jsonl"), rows(30).encode())
    storage.write_bytes(storage.join(folder.uri, "checkpoints", "step-0000030.pt"), b"30")
    (folder.local / "checkpoints").mkdir(parents=True)
    for s in (30, 40):
        (folder.local / "checkpoints" / f"step-{s:07d}.pt").write_bytes(str(s).encode())
    (folder.local / "metrics.jsonl").write_text(rows(40))
    folder.pull_latest()
    assert (folder.local / "metrics.jsonl").read_text() == rows(40)  # matches the local step-40 checkpoint
    # a fresh machine (nothing local) pulls S3's metrics and newest checkpoint
    (folder.local / "metrics.jsonl").unlink()
    for p in (folder.local / "checkpoints").iterdir():
        p.unlink()
    folder.pull_latest()
    assert (folder.local / "metrics.jsonl").read_text() == rows(30)
    assert (folder.local / "checkpoints" / "step-0000030.pt").read_bytes() == b"30"
