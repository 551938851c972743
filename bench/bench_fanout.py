"""Fan-out cost on Prefect: one cohort of N shards generated in-process, then through the real stack
(Postgres + Prefect server + SeaweedFS) with 1 and with 2 process workers; prints wall times, the
per-shard-flow-run overhead, and an extrapolation to 8 GPUs × 1,000,000 images.

    python bench/bench_fanout.py --medmnist-root ../shared/datasets/medmnist            # trains a tiny model
    python bench/bench_fanout.py --model storage/models/<run-id> --shards 8 --per-shard 64

The GPU throughput in the extrapolation is an input (``--gpu-images-per-s``): measure it with
``bench/bench_generate.py`` on the GPU you plan for; without one it is an ASSUMPTION and printed as such.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meddiff.ops.devstack import DevStackConfig, running_stack  # noqa: E402
from meddiff.ops.services import start_worker, kill_group  # noqa: E402


def tiny_model(medmnist_root: str, root: str) -> str:
    from meddiff.data.ingest import IngestConfig, ingest
    from meddiff.train import TrainConfig, train

    ds = ingest(IngestConfig("medmnist:bloodmnist", medmnist_root=medmnist_root), root).uri
    return train(TrainConfig(ds, mode="conditional", preset="tiny", steps=20, batch_size=16, device="cpu",
                             preview_steps=2), root).uri


def in_process(model: str, args, root: str) -> float:
    from meddiff.generate import CohortSpec, generate

    t0 = time.time()
    generate(CohortSpec(model, total=args.shards * args.per_shard, steps=args.steps, batch_size=args.per_shard,
                        device="cpu", shard_size=args.per_shard, name="bench-inprocess"), root)
    return time.time() - t0


def through_stack(cfg: DevStackConfig, env: dict, model: str, args, name: str) -> float:
    params = {"model_uri": model, "total": args.shards * args.per_shard, "steps": args.steps,
              "batch_size": args.per_shard, "device": "cpu", "shard_size": args.per_shard, "name": name,
              "evaluate": "false"}
    argv = [sys.executable, "-m", "prefect", "deployment", "run", "generate-cohort/default", "--watch"]
    argv += [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    t0 = time.time()
    run = subprocess.run(argv, env={**os.environ, **env, "PREFECT_HOME": str(cfg.home / "prefect-home")},
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return time.time() - t0


def extrapolate(overhead_s: float, gpu_ips: float, measured: bool, images: int = 1_000_000, gpus: int = 8,
                shard: int = 10_000) -> str:
    shards = math.ceil(images / shard)
    waves = math.ceil(shards / gpus)
    per_shard = shard / gpu_ips + overhead_s
    total = waves * per_shard + 2 * overhead_s  # + the parent run and the merge
    tag = "measured" if measured else "ASSUMPTION (no GPU here)"
    return (f"{gpus} GPUs × {images:,} images, shards of {shard:,}: {shards} shard runs in {waves} waves of "
            f"{per_shard:.0f} s ({shard / gpu_ips:.0f} s sampling at {gpu_ips:,.0f} images/s per GPU [{tag}] + "
            f"{overhead_s:.0f} s flow-run overhead) ≈ {total / 60:.0f} min; overhead share "
            f"{overhead_s / per_shard:.1%} (vs {overhead_s / (overhead_s + 100 / gpu_ips):.0%} with 100-image shards)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a finished model URI; default: train a tiny BloodMNIST model")
    ap.add_argument("--medmnist-root", default=os.environ.get("MEDMNIST_ROOT"))
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--per-shard", type=int, default=32, help="images per shard (= batch size)")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps")
    ap.add_argument("--poll-s", type=int, default=10, help="worker polling interval (Prefect's default 10)")
    ap.add_argument("--gpu-images-per-s", type=float, default=500.0,
                    help="per-GPU sampling throughput for the extrapolation (default: an ASSUMPTION)")
    ap.add_argument("--gpu-measured", action="store_true", help="--gpu-images-per-s was measured on a GPU")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    model = args.model or tiny_model(args.medmnist_root, str(work / "storage"))
    t_local = in_process(model, args, str(work / "storage"))
    cfg = DevStackConfig(state_dir=str(work / "stack"), gpu_workers=0, cpu_workers=0, ui=False,
                         poll_s=args.poll_s)
    with running_stack(cfg) as state:
        worker_env = {**state.env, "MEDDIFF_REPO": str(Path(__file__).resolve().parents[1])}
        home, logs = cfg.home / "prefect-home", cfg.home / "logs"
        workers = [start_worker("gpu-0", "gpu", worker_env, home, logs, 2, args.poll_s)]
        try:
            t1 = through_stack(cfg, state.env, model, args, "bench-1-worker")
            workers.append(start_worker("gpu-1", "gpu", worker_env, home, logs, 2, args.poll_s))
            t2 = through_stack(cfg, state.env, model, args, "bench-2-workers")
        finally:
            for w in workers:
                kill_group(w.pid)
    n = args.shards
    overhead = (t1 - t_local) / (n + 1)  # one worker runs the shards one after another, plus the parent
    print(f"cohort: {n} shards × {args.per_shard} images, {args.steps} steps, tiny model, CPU; poll {args.poll_s} s")
    print(f"{'mode':<28}{'wall s':>8}")
    print(f"{'in-process (no Prefect)':<28}{t_local:>8.1f}")
    print(f"{'stack, 1 gpu worker':<28}{t1:>8.1f}")
    print(f"{'stack, 2 gpu workers':<28}{t2:>8.1f}")
    print(f"per-flow-run overhead ≈ (1-worker − in-process) / (shards + parent) = {overhead:.1f} s")
    print(extrapolate(overhead, args.gpu_images_per_s, args.gpu_measured))


if __name__ == "__main__":
    main()
