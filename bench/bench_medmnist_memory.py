"""Memory of a MedMNIST ingest at a large image size: peak resident and anonymous memory, and time.

The 224 px MedMNIST files cannot be downloaded here, so this builds one from the official BloodMNIST
file: every image of every split, resized (bilinear) to ``--size``, saved as ``bloodmnist_<size>.npz``
the way MedMNIST ships it (np.savez_compressed). The ingest runs in a child process with that file's
md5 put in place of the official one; the parent samples /proc/<pid>/status every 50 ms.

    python bench/bench_medmnist_memory.py --medmnist-root ../shared/datasets/medmnist --size 128
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import sys, medmnist
from meddiff.data.ingest import IngestConfig, ingest
from meddiff.records import file_digest
root, storage, size, shard = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
medmnist.INFO["bloodmnist"][f"MD5_{size}"] = file_digest(f"{root}/bloodmnist_{size}.npz", "md5")
r = ingest(IngestConfig("medmnist:bloodmnist", size=size, shard_size=shard, medmnist_root=root), storage)
print(sum(r.card["totals"].values()))
"""


def build(src: Path, out: Path, size: int) -> int:
    from PIL import Image

    arrays = {}
    with np.load(src) as npz:
        for split in ("train", "val", "test"):
            images = npz[f"{split}_images"]  # N×28×28×3
            arrays[f"{split}_images"] = np.stack(
                [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])
            arrays[f"{split}_labels"] = npz[f"{split}_labels"]
    np.savez_compressed(out, **arrays)
    return sum(a.nbytes for k, a in arrays.items() if k.endswith("_images"))


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                out[key] = int(rest.split()[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--medmnist-root", default=os.environ.get("MEDMNIST_ROOT", "../shared/datasets/medmnist"))
    p.add_argument("--size", type=int, default=128, choices=(64, 128, 224))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "medmnist"
        root.mkdir()
        npz = root / f"bloodmnist_{args.size}.npz"
        nbytes = build(Path(args.medmnist_root) / "bloodmnist.npz", npz, args.size)
        print(f"bloodmnist_{args.size}.npz: {npz.stat().st_size / 2**20:,.0f} MiB on disk, "
              f"{nbytes / 2**20:,.0f} MiB of images uncompressed")
        storage = Path(tmp) / "storage"
        for run, shard in (("first ingest", 1000), ("second ingest (another --shard-size: a new version)", 2000)):
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(storage), str(args.size), str(shard)],
                                    stdout=subprocess.PIPE, text=True)
            peak_anon = hwm = 0
            while proc.poll() is None:
                try:
                    s = status_kib(proc.pid)
                    peak_anon, hwm = max(peak_anon, s.get("RssAnon", 0)), max(hwm, s.get("VmHWM", 0))
                except (FileNotFoundError, ProcessLookupError):
                    break
                time.sleep(0.05)
            out, _ = proc.communicate()
            secs = time.perf_counter() - t0
            if proc.returncode:
                sys.exit(f"ingest failed ({proc.returncode})")
            print(f"{run}: {out.strip()} images in {secs:.1f} s; peak RSS {hwm / 2**10:,.0f} MiB, "
                  f"peak anonymous (not file-backed) {peak_anon / 2**10:,.0f} MiB")


if __name__ == "__main__":
    main()
