"""Build a cohort folder from given images (real ones, copies, perturbations) — for the evaluation
tests and bench before/without a trained model: shards via write_shard, the manifest via
cohorts.manifest_table, and a cohort.json card written last."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiff import storage
from meddiff.data.cohorts import manifest_table, parquet_bytes
from meddiff.data.images import encode_png
from meddiff.records import now_iso, sha256_bytes
from meddiff.data.shards import encode_sample, write_shard


def make_cohort(folder: str | Path, dataset_uri: str, class_names: list[str], images: np.ndarray,
                labels: np.ndarray, model_uri: str | None = None, shard_size: int = 5000) -> str:
    """images uint8 N×C×H×W, labels int N → a complete cohort at ``folder``; returns its URI."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows, shards = [], []
    for s0 in range(0, len(images), shard_size):
        name = f"synthetic-{s0 // shard_size:06d}.tar"
        samples = []
        for i in range(s0, min(s0 + shard_size, len(images))):
            img = images[i]
            png = encode_png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            key = f"s{i:07d}"
            c = int(labels[i])
            samples.append(encode_sample(key, png, c, {"label_name": class_names[c]}))
            rows.append({"sample_id": i, "key": key, "shard": name, "class_id": c, "class_name": class_names[c],
                         "seed": i, "model_uri": model_uri, "checkpoint_sha256": None, "sampler": "test",
                         "steps": 0, "guidance_scale": None, "image_sha256": sha256_bytes(png),
                         "created_at": now_iso(), "meddiff_version": "test"})
        write_shard(folder / name, samples)
        shards.append(name)
    storage.write_bytes(str(folder / "manifest.parquet"), parquet_bytes(manifest_table(rows)))
    counts = {n: int((labels == c).sum()) for c, n in enumerate(class_names) if (labels == c).any()}
    storage.write_json(str(folder / "cohort.json"), {"kind": "cohort", "class_names": list(class_names),
                                                     "dataset_uri": dataset_uri, "model_uri": model_uri,
                                                     "counts": counts, "shards": shards})
    return str(folder)
