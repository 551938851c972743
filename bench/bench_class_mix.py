"""Class mix of training batches as training reads them: shuffled-at-rest shards vs class-ordered ones.

A class-ordered folder source of real BloodMNIST images (``--classes`` classes × ``--per-class``
images) is ingested; the training reader (``meddiff.train.batches``, its default 2,000-sample
shuffle buffer) then yields batches of 32. Printed per layout: mean largest-class share per batch,
share of single-class batches, and the same statistic for i.i.d. batches. "class-ordered" re-packs
the same shards class by class, as ingest wrote archive sources before issue 16.

    MEDDIFF_TEST_DATASETS=../shared/datasets python bench/bench_class_mix.py [--per-class 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from meddiff.data.ingest import IngestConfig, ingest
from meddiff.data.shards import encode_sample, iter_shard, open_dataset, write_shard
from meddiff.train.batches import DataSpec, batches


def folder_source(npz: Path, dest: Path, classes: list[int], per_class: int) -> Path:
    with np.load(npz) as z:
        x, y = z["train_images"], z["train_labels"].reshape(-1)
    for c in classes:
        (dest / f"class{c}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(y == c)[:per_class]):
            Image.fromarray(x[i]).save(dest / f"class{c}" / f"{j:05d}.png")
    return dest


def class_ordered_copy(uri: str, dest: Path) -> str:
    """The same version with its train shards re-packed class by class (the pre-issue-16 layout)."""
    shutil.copytree(uri, dest)
    ds = open_dataset(str(dest))
    shards = ds.shard_uris("train")
    samples = sorted((s for u in shards for s in iter_shard(u)), key=lambda s: (int(s["cls"]), s["__key__"]))
    size = -(-len(samples) // len(shards))
    for k, u in enumerate(shards):
        part = samples[k * size:(k + 1) * size]
        write_shard(Path(u), [encode_sample(s["__key__"], s["png"], int(s["cls"]), {}) for s in part])
    return str(dest)


def mix(uri: str, batch: int) -> tuple[float, float, np.ndarray]:
    ds = open_dataset(uri)
    n = ds.card["totals"]["train"] // batch
    stream = batches(ds, DataSpec(), batch_size=batch, seed=0, start_step=0)
    labels = np.stack([next(stream)[1].numpy() for _ in range(n)])  # (n, batch)
    top = np.array([np.bincount(b).max() / batch for b in labels])
    return float(top.mean()), float((top == 1).mean()), labels.reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=2000)
    ap.add_argument("--classes", default="1,3,6", help="BloodMNIST class ids")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    npz = Path(os.environ.get("MEDDIFF_TEST_DATASETS", "../shared/datasets")) / "medmnist" / "bloodmnist.npz"
    with tempfile.TemporaryDirectory() as tmp:
        src = folder_source(npz, Path(tmp) / "src", [int(c) for c in args.classes.split(",")], args.per_class)
        r = ingest(IngestConfig(f"folder:{src}", size=28, shard_size=1000), str(Path(tmp) / "st"))
        ordered = class_ordered_copy(r.uri, Path(tmp) / "ordered")
        print(f"{r.card['totals']['train']} training images, {len(r.card['shards']['train'])} shards, batch "
              f"{args.batch}, shuffle buffer {DataSpec().shuffle_buffer}")
        print(f"{'layout at rest':<26}{'largest-class share':>21}{'single-class batches':>22}{'i.i.d. share':>14}")
        for name, uri in (("shuffled (ingest now)", r.uri), ("class-ordered (before)", ordered)):
            top, single, labels = mix(uri, args.batch)
            p = np.bincount(labels) / len(labels)
            iid = (np.random.default_rng(0).multinomial(args.batch, p, size=20000).max(1) / args.batch).mean()
            print(f"{name:<26}{top:>21.3f}{single:>21.1%}{iid:>14.3f}")


if __name__ == "__main__":
    main()
