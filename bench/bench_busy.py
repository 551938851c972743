"""Training and sampling on a busy machine: wall time with 0, 1 and 2 competing CPU-bound processes.

    python bench/bench_busy.py --medmnist-root ../shared/datasets/medmnist            # issue 16's figure
    python bench/bench_busy.py --medmnist-root ... --steps 40 --per-class 4 --repeats 3   # shorter

Each measurement is a fresh process (``--worker``) that runs the library call and reports its own
wall time: ``train`` = ``--steps`` optimiser steps of the ``tiny`` preset on BloodMNIST 28 px
(conditional, DDPM, no previews or checkpoints until the end), ``sample`` = a cohort of
``--per-class`` images per class with ``--sample-steps`` DDIM steps from a model trained once up front.
A competitor is ``python -c 'while True: pass'`` (one CPU each), started 1 s before the measurement.

Modes (``--modes``): ``1thread`` = meddiff.threads pinned to one thread (its quiet time over the
quiet ``after`` time is one CPU's speed: what a process can expect when a competitor holds the other
of 2 CPUs); ``Nthread`` pins N threads the same way (``2thread`` beside a competitor shows what a
second thread with no free CPU costs), ``before`` = torch's own thread defaults (one OpenMP thread per core, libgomp's default
spin-waiting; ``MEDDIFF_THREAD_TUNING=off``), ``after`` = meddiff.threads (free-CPU sizing,
``OMP_WAIT_POLICY=PASSIVE`` when the CPUs are already busy at start; each run prints the policy it got). Runs are interleaved (repeat → load → mode) so drift hits all
cells alike; the table prints medians and ratios to the same mode's 0-competitor median.
Targets (issue 16): one competitor ≤ 1.3× quiet, two ≤ 2.2×, after-quiet no slower than before-quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOG = "while True: pass"


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line with its wall time."""
    import meddiff  # noqa: F401  (first: sets the OpenMP wait policy before torch loads it)
    import torch

    if args.worker == "train":
        from meddiff.train import TrainConfig, train

        big = 10 ** 6
        cfg = TrainConfig(args.dataset, steps=args.steps, device="cpu", run_name=args.name, resume=False,
                          checkpoint_every=big, sample_every=big, log_every=max(1, args.steps // 5)).check()
        t0 = time.perf_counter()
        uri = train(cfg, args.root).uri
    else:
        from meddiff.generate import CohortSpec, generate

        spec = CohortSpec(args.model, per_class=args.per_class, steps=args.sample_steps, sampler="ddim",
                          device="cpu", name=args.name).check()
        t0 = time.perf_counter()
        uri = generate(spec, args.root).uri
    print(json.dumps({"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(), "uri": uri,
                      "wait": os.environ.get("OMP_WAIT_POLICY") or "spin"}))


def run_worker(kind: str, mode: str, name: str, args: argparse.Namespace, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MEDDIFF_THREADS",
                                                            "OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    env["MEDDIFF_THREAD_TUNING"] = "off" if mode == "before" else "on"
    if mode.endswith("thread"):  # meddiff.threads with the pool pinned to N threads ("1thread", "2thread", ...)
        env["MEDDIFF_THREADS"] = mode.removesuffix("thread")
    cmd = [sys.executable, __file__, "--worker", kind, "--root", args.root, "--name", name, *extra]
    out = subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def with_competitors(n: int, fn):
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]
    try:
        time.sleep(1.0 if n else 0.0)
        return fn()
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def setup(args: argparse.Namespace) -> tuple[str, str]:
    """Ingest BloodMNIST and train the model sampling uses (once, quiet, untimed)."""
    from meddiff.data.ingest import IngestConfig, ingest

    ds = ingest(IngestConfig("medmnist:bloodmnist", medmnist_root=args.medmnist_root), args.root).uri
    model = run_worker("train", "after", "bench-busy-sampling-model",
                       argparse.Namespace(**{**vars(args), "root": args.root}),
                       ["--dataset", ds, "--steps", "20"])["uri"]
    return ds, model


def table(results: dict, kinds: list[str], modes: list[str], loads: list[int]) -> None:
    print(f"\n{'workload':8} {'mode':7} {'competitors':>11} {'median s':>9} {'runs (s)':>26} {'threads':>8} {'× quiet':>8}")
    for kind in kinds:
        for mode in modes:
            quiet = statistics.median(r["seconds"] for r in results[kind, mode, loads[0]])
            for n in loads:
                rs = results[kind, mode, n]
                med = statistics.median(r["seconds"] for r in rs)
                runs = " ".join(f"{r['seconds']:.1f}" for r in rs)
                thr = ",".join(sorted({str(r["threads"]) for r in rs}))
                print(f"{kind:8} {mode:7} {n:>11} {med:>9.1f} {runs:>26} {thr:>8} {med / quiet:>7.2f}×")
        if {"before", "after"} <= set(modes) and 0 in loads:
            b = statistics.median(r["seconds"] for r in results[kind, "before", 0])
            a = statistics.median(r["seconds"] for r in results[kind, "after", 0])
            print(f"{kind:8} quiet after / quiet before = {a / b:.2f}")
        if {"1thread", "after"} <= set(modes) and 0 in loads:
            one = statistics.median(r["seconds"] for r in results[kind, "1thread", 0])
            a = statistics.median(r["seconds"] for r in results[kind, "after", 0])
            print(f"{kind:8} quiet 1 thread / quiet after = {one / a:.2f}  (one CPU's speed for this workload: what a "
                  f"process held to one of {len(os.sched_getaffinity(0))} CPUs by a competitor can expect)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--medmnist-root", default=os.environ.get("MEDMNIST_ROOT"))
    p.add_argument("--steps", type=int, default=150, help="training steps per measurement")
    p.add_argument("--per-class", type=int, default=8, help="sampling: images per class (8 classes)")
    p.add_argument("--sample-steps", type=int, default=50, help="sampling: DDIM steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loads", default="0,1,2", help="competitor counts")
    p.add_argument("--modes", default="before,after")
    p.add_argument("--kinds", default="train,sample")
    p.add_argument("--root", default=None, help="storage root (default: a temp folder)")
    # worker-only
    p.add_argument("--worker", choices=["train", "sample"])
    p.add_argument("--name")
    p.add_argument("--dataset")
    p.add_argument("--model")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    tmp = tempfile.TemporaryDirectory(prefix="bench-busy-")
    args.root = args.root or tmp.name
    loads, modes, kinds = ([int(x) for x in args.loads.split(",")], args.modes.split(","), args.kinds.split(","))
    bad = [m for m in modes if m not in ("before", "after") and not (m.endswith("thread") and m[:-6].isdigit())]
    if bad:
        p.error(f"unknown mode(s) {bad}: use before, after or Nthread (e.g. 1thread, 2thread)")
    print(f"{os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), load average at start "
          f"{os.getloadavg()[0]:.2f}; train {args.steps} steps, sample {args.per_class}/class × {args.sample_steps} "
          f"steps; {args.repeats} repeats", flush=True)
    ds, model = setup(args)
    results: dict = {(k, m, n): [] for k in kinds for m in modes for n in loads}
    i = 0
    for rep in range(args.repeats):
        for n in loads:
            for mode in modes:
                for kind in kinds:
                    i += 1
                    extra = (["--dataset", ds, "--steps", str(args.steps)] if kind == "train" else
                             ["--model", model, "--per-class", str(args.per_class), "--sample-steps",
                              str(args.sample_steps)])
                    r = with_competitors(n, lambda: run_worker(kind, mode, f"busy-{kind}-{i}", args, extra))
                    results[kind, mode, n].append(r)
                    print(f"  rep {rep} {kind:6} {mode:6} competitors={n}: {r['seconds']:.1f} s "
                          f"({r['threads']} threads, OpenMP wait {r.get('wait')}; load avg {os.getloadavg()[0]:.2f})",
                          flush=True)
    table(results, kinds, modes, loads)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
