"""Training throughput (images/s) and peak memory per preset and image size; MFU on CUDA.

    python bench/bench_train.py                         # tiny/small/base at 28 and 64 px, CPU (or CUDA)
    python bench/bench_train.py --presets tiny --sizes 28 --steps 20 --batch 32

Each (preset, size) runs in a fresh subprocess (so the peak RSS is its own) and times
``meddiff.train_step.train_step``, the step training runs: forward + loss (DDPM ε), backward,
grad clipping, AdamW, LR schedule, EMA update, on a synthetic 3-channel batch (data loading
excluded; ``metrics.jsonl`` of a real run reports the end-to-end figure). On CUDA it uses bf16
autocast + channels-last like training.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` counts one forward pass of the network
(convolutions, matmuls, attention); a training step is counted as 3× that (backward ≈ 2×
forward); elementwise ops, GroupNorm, AdamW and EMA are not counted. MFU = counted FLOP/s ÷ the
GPU's dense bf16 peak (table below; unknown GPUs print no MFU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "RTX 4090": 165.0}  # dense (no sparsity) bf16 tensor-core peaks


def one(preset: str, size: int, batch: int, steps: int, device: str, compile_: bool = False) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from meddiff.models.diffusion import build_scheduler, scheduler_config
    from meddiff.models.networks import param_count
    from meddiff.train.presets import get_preset
    from meddiff.train.step import build_training_state, train_step

    dev = torch.device(device)
    torch.manual_seed(0)
    st = build_training_state(get_preset(preset).network, 3, 9, dev, lr=1e-4, weight_decay=0.0, warmup_steps=1,
                              ema_decay=0.999)
    net = st.net
    sched = build_scheduler(scheduler_config("ddpm", "linear", "epsilon", 1000, size))
    x = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    y = torch.randint(0, 9, (batch,), device=dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    with FlopCounterMode(display=False) as fc, torch.no_grad(), autocast:
        net(x, timesteps=torch.randint(0, 1000, (batch,), device=dev), class_labels=y)
    flops_per_step = 3 * fc.get_total_flops()

    model = torch.compile(net) if compile_ else net

    def step():
        train_step(model, st, sched, x, y, "epsilon", None, 1.0, autocast)

    for _ in range(3 if compile_ else 2 if dev.type == "cuda" else 1):  # warm-up (allocator, cuDNN/oneDNN kernel choice)
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = {"preset": preset, "size": size, "batch": batch, "device": device, "params_m": param_count(net) / 1e6,
           "images_per_s": steps * batch / dt, "step_ms": 1000 * dt / steps, "peak_mb": peak,
           "gflop_per_step": flops_per_step / 1e9, "tflops": flops_per_step * steps / dt / 1e12,
           "threads": torch.get_num_threads(), "compile": compile_}
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        out["gpu"] = name
        peak_tf = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        out["mfu"] = out["tflops"] / peak_tf if peak_tf else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small,base")
    p.add_argument("--sizes", default="28,64")
    p.add_argument("--batch", type=int, default=None, help="default: CPU tiny 32, small 8, base 4; CUDA 128")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default: CPU tiny 10, small 3, base 2; CUDA 50)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        preset, size, batch, steps, device = args.one
        print(json.dumps(one(preset, int(size), int(batch), int(steps), device, args.compile)))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{os.cpu_count()} CPU cores'}), "
          f"torch {torch.__version__}; FLOPs = 3 × FlopCounterMode(forward)")
    head = f"{'preset':6} {'px':>4} {'batch':>5} {'params':>8} {'images/s':>9} {'ms/step':>8} {'peak MiB':>9} " \
           f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'threads':>7}" + (f" {'MFU':>6}" if device == "cuda" else "")
    print(head)
    for preset in args.presets.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            batch = args.batch or (128 if device == "cuda" else {"tiny": 32, "small": 8}.get(preset, 4))
            steps = args.steps or (50 if device == "cuda" else {"tiny": 10, "small": 3}.get(preset, 2))
            env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
            res = subprocess.run([sys.executable, __file__, "--one", preset, str(size), str(batch), str(steps), device]
                                 + (["--compile"] if args.compile else []),
                                 capture_output=True, text=True, env=env)
            if res.returncode:
                print(f"{preset:6} {size:>4} failed: {res.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            line = (f"{preset:6} {size:>4} {batch:>5} {r['params_m']:>7.2f}M {r['images_per_s']:>9.1f} "
                    f"{r['step_ms']:>8.0f} {r['peak_mb']:>9.0f} {r['gflop_per_step']:>10.2f} {r['tflops']:>8.3f} "
                    f"{r['threads']:>7}")
            if device == "cuda":
                line += f" {r['mfu']:>6.1%}" if r.get("mfu") is not None else "      -"
            print(line, flush=True)


if __name__ == "__main__":
    main()
