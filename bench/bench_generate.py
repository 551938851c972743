"""Sampling throughput: samples/s per sampler × steps × image size × batch size.

Networks are freshly initialised presets (throughput does not depend on the weights), so no
trained model is needed:

    python bench/bench_generate.py --device cpu --preset tiny --sizes 28 64 --steps 10 25 50 100 --batch-sizes 16 64
    python bench/bench_generate.py --device cuda --preset small --batch-sizes 256 512 --steps 10 25 50 100 1000
"""

from __future__ import annotations

import argparse
import time

import torch

from meddiff.models.trained import TrainedModel
from meddiff.models.diffusion import scheduler_config
from meddiff.generate.sampling import generate_images
from meddiff.models.networks import build_network, param_count
from meddiff.models.samplers import RFLOW_SAMPLERS
from meddiff.train.presets import PRESETS


def make_model(preset: str, size: int, objective: str, device: torch.device, classes: int = 8) -> TrainedModel:
    net = build_network(PRESETS[preset].network, 3, classes + 1).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    cfg = scheduler_config(objective, "linear", "v", 1000, size)  # the training default
    return TrainedModel(uri=f"bench:{preset}", card={}, mode="conditional", class_names=[str(i) for i in range(classes)],
                        channels=3, image_size=size, objective=objective, scheduler_config=cfg, networks={None: net},
                        checkpoint_sha256={"model": "bench"}, null_class=classes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--samplers", nargs="+", default=["dpmpp2m", "ddim", "ddpm", "heun", "rflow"])
    p.add_argument("--guidance", type=float, default=2.0, help="CFG scale (2 forwards per step when ≠ 1)")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f" preset={args.preset} guidance={args.guidance}")
    print(f"{'sampler':8} {'px':>4} {'batch':>6} {'steps':>6} {'seconds':>9} {'samples/s':>10} {'ms/step':>8}")
    for size in args.sizes:
        for sampler in args.samplers:
            model = make_model(args.preset, size, "rflow" if sampler in RFLOW_SAMPLERS else "ddpm", device)
            if sampler == args.samplers[0]:
                print(f"# {param_count(model.networks[None]) / 1e6:.2f} M parameters at {size} px")
            for bs in args.batch_sizes:
                classes = [i % 8 for i in range(bs)]
                generate_images(model, classes, list(range(bs)), sampler, 2, args.guidance, device)  # warm-up
                for steps in args.steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    generate_images(model, classes, list(range(bs)), sampler, steps, args.guidance, device)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    print(f"{sampler:8} {size:>4} {bs:>6} {steps:>6} {dt:>9.2f} {bs / dt:>10.1f} {1000 * dt / steps:>8.1f}",
                          flush=True)


if __name__ == "__main__":
    main()
