"""Pixel vs latent diffusion cost at 64, 128 and 224 px (same denoiser preset), and the autoencoder's
encode/decode throughput and reconstruction quality. Prints a table; run alone for clean figures.

    python bench/bench_latent.py                                   # sizes 64 128 224, tiny presets, CPU
    python bench/bench_latent.py --ae-steps 200 --data zip:../shared/datasets/kaggle/leukemia-sample.zip

Cost figures use random tensors of the right shapes (a step's cost does not depend on pixel values):
- train step: one denoiser optimiser step (batch ``--batch``) on (C, S, S) pixels vs (C_lat, S/f, S/f)
  latents read from latent shards; "+enc" adds encoding that batch on the fly;
- per image: ``--sample-steps`` denoiser forwards (no guidance) per image, + one decode for latents;
- peak memory: peak RSS of a fresh subprocess doing that train step (CPU) or CUDA max allocated.
With ``--ae-steps N`` (> 0) a tiny VAE is trained on the real images at each size (content-addressed
under ``--storage``, reused on re-runs) and its val PSNR/SSIM printed beside the cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def measure(size: int, space: str, preset: str, ae_preset: str, batch: int, sample_steps: int, reps: int,
            device: str) -> dict:
    """Seconds per train step and per generated image for one (size, space); run in its own process."""
    import resource

    from meddiff.models.autoencoders import build_autoencoder, get_ae_preset, latent_shape
    from meddiff.models.diffusion import build_scheduler, scheduler_config
    from meddiff.train.presets import get_preset
    from meddiff.train.step import build_training_state, train_step

    torch.manual_seed(0)
    dev = torch.device(device)
    d = get_ae_preset(ae_preset).definition("vae")
    ae = build_autoencoder(d, 3).to(dev).eval().requires_grad_(False)
    shape = latent_shape(d, size) if space != "pixel" else (3, size, size)
    st = build_training_state(get_preset(preset).network, shape[0], 3, dev, 1e-4, 0.0, 1, 0.99)
    sched = build_scheduler(scheduler_config("rflow", "linear", "epsilon", 1000, shape[1]))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    x_img = torch.randn(batch, 3, size, size, device=dev)
    x = torch.randn(batch, *shape, device=dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)

    def step():
        inp = ae.encode(x_img) if space == "latent+enc" else x
        train_step(st.net, st, sched, inp, y, "epsilon", None, 1.0, autocast)

    step_s = _time(step, reps)
    net = st.net.eval()

    @torch.no_grad()
    def one_image():
        z = torch.randn(1, *shape, device=dev)
        for i in range(sample_steps):
            z = z - net(z, timesteps=torch.full((1,), 1000.0 * (1 - i / sample_steps), device=dev),
                        class_labels=y[:1]) / sample_steps
        if space != "pixel":
            ae.decode(z, size)

    image_s = _time(one_image, max(1, reps // 2))
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = {"size": size, "space": space, "shape": list(shape), "step_s": step_s, "image_s": image_s,
           "peak_mb": round(peak, 1)}
    if space == "latent":
        out["encode_img_s"] = batch / _time(lambda: ae.encode(x_img), reps)
        z = torch.randn(batch, *shape, device=dev)
        out["decode_img_s"] = batch / _time(lambda: ae.decode(z, size), reps)
    return out


def recon_quality(data: str, size: int, ae_steps: int, storage_root: str, device: str) -> dict:
    """Train (or find) a tiny VAE on the real images at ``size``; val PSNR/SSIM of its reconstructions."""
    from meddiff.data.ingest import IngestConfig, ingest
    from meddiff.data.shards import open_dataset
    from meddiff.evaluate.reconstruction import pixel_metrics, reconstruct
    from meddiff.models.autoencoders import load_autoencoder
    from meddiff.train.ae_config import AETrainConfig
    from meddiff.train.autoencoder import train_autoencoder

    ds_uri = ingest(IngestConfig(data, size=size), storage_root).uri
    ae_uri = train_autoencoder(AETrainConfig(ds_uri, "vae", steps=ae_steps, batch_size=16, device=device),
                               storage_root).uri
    x, _ = open_dataset(ds_uri).load_split("val")
    x_hat, _ = reconstruct(load_autoencoder(ae_uri, device), x)
    m = pixel_metrics(x, x_hat)
    return {"psnr_db": m["psnr_db"]["mean"], "ssim": m["ssim"]["mean"], "n": len(x), "ae_uri": ae_uri}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    ap.add_argument("--preset", default="tiny", help="denoiser preset (the same for pixel and latent)")
    ap.add_argument("--ae-preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ae-steps", type=int, default=0, help="> 0: train a tiny VAE per size and report PSNR/SSIM")
    ap.add_argument("--data", default="zip:../shared/datasets/kaggle/leukemia-sample.zip")
    ap.add_argument("--storage", default="storage")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement as JSON (own process)
    a = ap.parse_args()
    if a.one:
        size, space = a.one.split(":")
        print(json.dumps(measure(int(size), space, a.preset, a.ae_preset, a.batch, a.sample_steps, a.reps, a.device)))
        return
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, batch {a.batch}, "
          f"{a.sample_steps} sample steps, denoiser preset {a.preset}, AE preset {a.ae_preset} (VAE)")
    print(f"{'px':>4} {'space':<11} {'shape':<13} {'s/step':>8} {'×cheaper':>8} {'s/image':>8} {'×cheaper':>8} "
          f"{'peak MB':>8} {'enc img/s':>9} {'dec img/s':>9} {'PSNR':>6} {'SSIM':>5}")
    for size in a.sizes:
        rows = {}
        for space in ("pixel", "latent", "latent+enc"):
            cmd = [sys.executable, __file__, "--one", f"{size}:{space}", "--preset", a.preset, "--ae-preset",
                   a.ae_preset, "--batch", str(a.batch), "--sample-steps", str(a.sample_steps), "--reps",
                   str(a.reps), "--device", a.device]
            rows[space] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        q = recon_quality(a.data, size, a.ae_steps, a.storage, a.device) if a.ae_steps > 0 else {}
        px = rows["pixel"]
        for space, r in rows.items():
            lat = space == "latent"
            print(f"{size:>4} {space:<11} {'x'.join(map(str, r['shape'])):<13} {r['step_s']:>8.4f} "
                  f"{px['step_s'] / r['step_s']:>8.1f} {r['image_s']:>8.3f} {px['image_s'] / r['image_s']:>8.1f} "
                  f"{r['peak_mb']:>8.0f} {r.get('encode_img_s', 0):>9.0f} {r.get('decode_img_s', 0):>9.0f} "
                  f"{q.get('psnr_db', float('nan')) if lat else float('nan'):>6.2f} "
                  f"{q.get('ssim', float('nan')) if lat else float('nan'):>5.3f}")


if __name__ == "__main__":
    main()
