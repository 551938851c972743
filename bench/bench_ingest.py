"""Ingest and read-back throughput on BloodMNIST 28 px (targets: ingest ≤ 20 s on 2 cores,
read-back ≥ 5,000 images/s in one process).

    python bench/bench_ingest.py --medmnist-root ../shared/datasets/medmnist
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from meddiff.data.ingest import IngestConfig, ingest
from meddiff.data.shards import open_dataset


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--medmnist-root", default=os.environ.get("MEDMNIST_ROOT", "../shared/datasets/medmnist"))
    p.add_argument("--flag", default="bloodmnist")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        r = ingest(IngestConfig(f"medmnist:{args.flag}", medmnist_root=args.medmnist_root), root)
        t_ingest = time.perf_counter() - t0
        n = sum(r.card["totals"].values())
        print(f"ingest {args.flag} 28px: {n} images in {t_ingest:.2f} s ({n / t_ingest:,.0f} images/s) [target ≤ 20 s]")
        ds = open_dataset(r.uri)
        t0, count = time.perf_counter(), 0
        for split in ("train", "val", "test"):
            for img, _ in ds.pipeline(split):
                count += 1
        t_read = time.perf_counter() - t0
        print(f"read back as decoded float tensors: {count} images in {t_read:.2f} s "
              f"({count / t_read:,.0f} images/s) [target ≥ 5,000 images/s]")
        t0 = time.perf_counter()
        x, _ = ds.load_split("train")
        t_eager = time.perf_counter() - t0
        print(f"eager load_split('train'): {len(x)} images in {t_eager:.2f} s ({len(x) / t_eager:,.0f} images/s)")


if __name__ == "__main__":
    main()
