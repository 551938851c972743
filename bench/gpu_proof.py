"""GPU proof (issue 12): the `small` preset trained, sampled and evaluated on a real GPU, in steps.

Each step is separately resumable, well under 10 minutes (the device tool's per-command limit), and
writes its figures as JSON into ``WORK/figures/<step>.json`` (atomically; a finished step is skipped
on a re-run unless ``--force``). Run them in order, one device command each or several per command:

    python bench/gpu_proof.py pack --out .device        # HERE (no GPU): wheels, float16 Inception, data
    # on the GPU machine (carry .device; see bench/results/README.md for the exact device command):
    python bench/gpu_proof.py env      --work W         # torch/GPU facts + measured bf16 matmul peak
    python bench/gpu_proof.py tune     --work W         # small@28 px: images/s and MFU per batch × compile
    python bench/gpu_proof.py train    --work W --budget-s 540   # re-run until it says complete (resume!)
    python bench/gpu_proof.py generate --work W         # 10,000-image balanced cohort, images/s
    python bench/gpu_proof.py evaluate --work W         # inception + domain features, TSTR
    python bench/gpu_proof.py collect  --work W --out $OUT      # report, loss curve, grids, figures
    python bench/gpu_proof.py smoke    --work W         # CPU: every step with tiny settings (the test)

``train`` runs ``python -m meddiff.train`` in a child process and stops it (SIGTERM) when the budget
is spent: checkpoints every ``--checkpoint-every`` steps make the next command resume where this one
stopped, which is exactly the resume path on CUDA the proof must exercise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "tune", "train", "generate", "evaluate")
# what the device image lacks (it has torch): meddiff's runtime imports, without the CLI/Prefect stack
DEVICE_WHEELS = ("monai==1.6.1", "einops", "webdataset", "braceexpand", "medmnist", "fsspec", "torchmetrics",
                 "lightning-utilities", "torch-fidelity", "pyarrow", "pandas", "scipy", "matplotlib")


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


def step_tune(args) -> dict:
    """Training images/s and MFU of the preset at each batch size, eager and compiled; picks the best."""
    env = done(args.work, "env") or {}
    peak = env.get("bf16_peak_tflops_measured")
    rows = []
    for compile_ in (False, True) if args.device.startswith("cuda") else (False,):
        for batch in args.batches:
            cmd = [sys.executable, str(REPO / "bench" / "bench_train.py"), "--one", args.preset, "28", str(batch),
                   str(args.tune_steps), args.device] + (["--compile"] if compile_ else [])
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if res.returncode:
                rows.append({"batch": batch, "compile": compile_, "error": res.stderr.strip().splitlines()[-1]})
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r.update(batch=batch, compile=compile_, mfu_vs_measured_peak=r["tflops"] / peak if peak else None)
            rows.append(r)
            print(json.dumps(r), flush=True)
    ok = [r for r in rows if "error" not in r]
    best = max(ok, key=lambda r: r["images_per_s"]) if ok else None
    return {"preset": args.preset, "rows": rows, "best": best}


def step_train(args) -> dict | None:
    """Train (resume) the preset's class-conditional model until done or the budget is spent."""
    best = (done(args.work, "tune") or {}).get("best") or {}
    batch = args.batch_size or best.get("batch") or 128
    compile_ = bool(best.get("compile")) if args.compile is None else args.compile
    cmd = [sys.executable, __file__, "train-child", "--work", str(args.work), "--medmnist-root", args.medmnist_root,
           "--preset", args.preset, "--train-steps", str(args.train_steps), "--batch-size", str(batch),
           "--device", args.device, "--checkpoint-every", str(args.checkpoint_every), "--objective", args.objective,
           "--compile" if compile_ else "--no-compile"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=args.budget_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        print(f"budget of {args.budget_s} s spent: run `train` again to resume from the last checkpoint")
        return None
    if proc.returncode:
        raise SystemExit(f"training failed (exit {proc.returncode})")
    uri = out.strip().splitlines()[-1]
    card = json.loads((Path(uri) / "model.json").read_text())
    rows = [json.loads(line) for line in (Path(uri) / "metrics.jsonl").read_text().splitlines()]
    ips = sorted(r["images_per_s"] for r in rows[len(rows) // 10:])  # skip warm-up / compile
    return {"model_uri": uri, "steps": card["steps"], "batch_size": batch, "compile": compile_,
            "final_loss": card.get("final_loss"), "wall_time_s_total": card.get("wall_time_s"),
            "this_command_s": round(time.time() - t0, 1), "images_per_s_median": ips[len(ips) // 2] if ips else None,
            "device_name": card.get("device_name"), "param_count": card.get("param_count")}


def train_child(args) -> None:
    """The training process ``train`` starts (library call: no CLI/Prefect stack needed on the GPU box)."""
    from meddiff.train import TrainConfig, train

    cfg = TrainConfig(dataset_uri(args.work, args.medmnist_root), mode="conditional", preset=args.preset,
                      steps=args.train_steps, batch_size=args.batch_size, device=args.device,
                      objective=args.objective, checkpoint_every=args.checkpoint_every, compile=bool(args.compile))
    print(train(cfg, str(args.work / "storage")).uri, flush=True)


def step_generate(args) -> dict:
    from meddiff.generate import CohortSpec, generate

    model_uri = done(args.work, "train")["model_uri"]
    spec = CohortSpec(model_uri, total=args.cohort_size, sampler=args.sampler, steps=args.sample_steps,
                      batch_size=args.gen_batch, device=args.device, shard_size=2000)
    t0 = time.time()
    res = generate(spec, str(args.work / "storage"))
    return {"cohort_uri": res.uri, "total": sum(res.counts.values()), "sampler": res.card["sampler"],
            "steps": res.card["steps"], "seconds": round(time.time() - t0, 1),
            "images_per_s": res.card.get("samples_per_second"), "counts": res.counts}


def step_evaluate(args) -> dict:
    from meddiff.evaluate import EvalConfig, evaluate_cohort
    from meddiff.evaluate.features import DomainTrainConfig

    cohort_uri = done(args.work, "generate")["cohort_uri"]
    domain = DomainTrainConfig() if args.domain_steps is None else DomainTrainConfig(steps=args.domain_steps)
    cfg = EvalConfig(features=tuple(args.features), max_images=None, tstr=args.tstr, device=args.device,
                     domain=domain)
    t0 = time.time()
    res = evaluate_cohort(cohort_uri, cfg)
    return {"report_uri": res.report_uri, "seconds": round(time.time() - t0, 1), "headline": res.report["headline"]}


def collect(args) -> None:
    """Copy the proof's artifacts (never weights) into ``--out`` (flat names: the device tool's limits)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for step in STEPS:
        if done(args.work, step):
            shutil.copy(figures(args.work) / f"{step}.json", out / f"figures-{step}.json")
    train, gen = done(args.work, "train") or {}, done(args.work, "generate") or {}
    if train:
        model = Path(train["model_uri"])
        for name in ("loss_curve.png", "metrics.jsonl", "model.json"):
            if (model / name).is_file():
                shutil.copy(model / name, out / f"model-{name}")
    if gen:
        cohort = Path(gen["cohort_uri"])
        for name in ("report.json", "report.html", "cohort.json", "reverse_diffusion.png"):
            if (cohort / name).is_file():
                shutil.copy(cohort / name, out / name)
    print(f"collected into {out}: {sorted(p.name for p in out.iterdir())}")


def pack(args) -> None:
    """Here, before a GPU lease: wheels the device image lacks, a float16 Inception, the BloodMNIST file."""
    out = Path(args.out)
    (out / "whl").mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(out / "whl")] + [
        a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
    print(" ".join(pip + list(DEVICE_WHEELS)))
    if not args.dry_run:
        subprocess.run(pip + list(DEVICE_WHEELS), check=True)
        import torch

        from meddiff.evaluate.features import fid_helper_file

        src = fid_helper_file()
        if src is not None:
            m = torch.jit.load(str(src), map_location="cpu").half()
            torch.jit.save(m, str(out / "inception-fp16.pt"))
        shutil.copy(Path(args.medmnist_root) / "bloodmnist.npz", out / "bloodmnist.npz")
    print(f"carry {out}: pip install --no-index --no-deps --target /tmp/site {out}/whl/*.whl, "
          f"PYTHONPATH=/tmp/site MEDDIFF_INCEPTION_WEIGHTS={out}/inception-fp16.pt, --medmnist-root {out}")


RUNNERS = {"env": step_env, "tune": step_tune, "train": step_train, "generate": step_generate,
           "evaluate": step_evaluate}


def run_step(args, step: str) -> None:
    if done(args.work, step) and not args.force:
        print(f"{step}: done (figures/{step}.json); --force to redo")
        return
    result = RUNNERS[step](args)
    if result is not None:
        save(args.work, step, result)


def smoke_args(args) -> argparse.Namespace:
    """CPU settings that run every step in about a minute (what the test runs)."""
    return argparse.Namespace(**{**vars(args), "device": "cpu", "preset": "tiny", "batches": [16], "tune_steps": 2,
                                 "train_steps": 12, "checkpoint_every": 6, "batch_size": 16, "compile": False,
                                 "cohort_size": 16, "sample_steps": 4, "gen_batch": 8, "features": ["domain"],
                                 "tstr": False, "objective": "rflow", "domain_steps": 30})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=[*STEPS, "collect", "pack", "smoke", "train-child"])
    p.add_argument("--work", type=Path, default=Path("gpu-proof"), help="working folder (storage + figures)")
    p.add_argument("--out", default=".device", help="collect/pack: where files go")
    p.add_argument("--medmnist-root", default=os.environ.get("MEDMNIST_ROOT", "../shared/datasets/medmnist"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="small")
    p.add_argument("--objective", default="rflow", choices=["rflow", "ddpm"])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512], help="tune: batch sizes")
    p.add_argument("--tune-steps", type=int, default=30)
    p.add_argument("--train-steps", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=None, help="train: default the tuned best")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--budget-s", type=float, default=540, help="train: stop (resumably) after this many seconds")
    p.add_argument("--cohort-size", type=int, default=10_000)
    p.add_argument("--sampler", default="auto")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--gen-batch", type=int, default=1024)
    p.add_argument("--features", nargs="+", default=["inception", "domain"])
    p.add_argument("--domain-steps", type=int, default=None, help="evaluate: domain classifier steps")
    p.add_argument("--tstr", action=argparse.BooleanOptionalAction, default=True)
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
    elif args.step == "smoke":
        args = smoke_args(args)
        for step in STEPS:
            run_step(args, step)
        collect(args)
    else:
        run_step(args, args.step)


if __name__ == "__main__":
    main()
