"""Latent shards: a dataset version encoded once by an autoencoder (MAISI's precomputed embeddings),
``<dataset-version>/latents/<ae-run-id>/`` with ``<split>-%06d.tar`` and ``latents.json`` (last).

A sample is ``<key>.npy`` — the unscaled latent E(x) as float16 (C_lat, h, w) for a VAE, or the
codebook indices as uint16 (h, w) for a VQ-VAE — + ``<key>.cls``. Keys are the dataset's keys.
Training reads them whole into memory (latents are small) and multiplies by the scale factor.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from meddiff import storage
from meddiff.data.images import decode_png
from meddiff.data.shards import DatasetVersion, iter_shard, write_shard
from meddiff.data.sources import SPLITS
from meddiff.errors import MeddiffError
from meddiff.models.autoencoders import TrainedAutoencoder
from meddiff.progress import Progress
from meddiff.records import make_record

RECORD = "latents.json"
SHARD_SIZE = 10_000  # samples per latent shard


def latents_uri(ds: DatasetVersion, ae_run_id: str) -> str:
    return storage.join(ds.uri, "latents", ae_run_id)


def find_latents(ds: DatasetVersion, ref: dict[str, Any]) -> str | None:
    """URI of complete latent shards of ``ds`` made by exactly this autoencoder (same sha256), else None."""
    uri = latents_uri(ds, Path(ref["uri"]).name)
    rec = storage.join(uri, RECORD)
    if storage.exists(rec) and storage.read_json(rec).get("autoencoder", {}).get("sha256") == ref["sha256"]:
        return uri
    return None


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def encode_split(ds: DatasetVersion, ae: TrainedAutoencoder, split: str, out: Path, batch: int = 64,
                 done: Callable[[int], None] | None = None) -> tuple[list[str], int, int]:
    """Write ``out/<split>-%06d.tar``; returns (shard names, images, latent bytes). ``done(images so far)``."""
    vq = ae.card["ae_kind"] == "vqvae"
    samples, names, n, nbytes = [], [], 0, 0

    def flush() -> None:
        name = f"{split}-{len(names):06d}.tar"
        write_shard(out / name, samples)
        names.append(name)
        samples.clear()

    stream = (s for uri in ds.shard_uris(split) for s in iter_shard(uri))
    while chunk := list(itertools.islice(stream, batch)):
        x = torch.from_numpy(np.stack([decode_png(s["png"]) for s in chunk])).float().div(127.5).sub(1)
        x = x.to(next(ae.net.parameters()).device)  # (B, C, H, W) in [-1, 1]
        z = ae.net.codes(x).cpu().numpy().astype(np.uint16) if vq else ae.net.encode(x).cpu().numpy().astype(np.float16)
        for s, zi in zip(chunk, z):
            samples.append({"__key__": s["__key__"], "npy": _npy(zi), "cls": s["cls"]})
            nbytes += zi.nbytes
        n += len(chunk)
        if done is not None:
            done(n)
        if len(samples) >= SHARD_SIZE:
            flush()
    if samples or not names:
        flush()
    return names, n, nbytes


def write_latents(ds: DatasetVersion, ae: TrainedAutoencoder, extra: dict[str, Any] | None = None,
                  progress: Progress | None = None) -> tuple[str, dict]:
    """Encode every split of ``ds`` (a re-run with a complete record does nothing); ``latents.json`` last.
    ``progress(images encoded, images)`` over all splits."""
    ref = {"uri": ae.uri, "sha256": ae.sha256}
    uri = latents_uri(ds, Path(ae.uri).name)
    if find_latents(ds, ref):
        return uri, storage.read_json(storage.join(uri, RECORD))
    work = storage.local_staging(storage.storage_root(None), "latents") if storage.is_remote(uri) else Path(uri)
    work.mkdir(parents=True, exist_ok=True)
    shards, counts, latent_bytes = {}, {}, 0
    total = sum(ds.card["totals"].get(s, 0) for s in SPLITS if ds.card["shards"].get(s))
    for split in SPLITS:
        if ds.card["shards"].get(split):
            before = sum(counts.values())
            done = None if progress is None else (lambda n, before=before: progress(before + n, total))
            shards[split], counts[split], b = encode_split(ds, ae, split, work, done=done)
            latent_bytes += b
    total = sum(counts.values())
    pixel_bytes = total * ds.channels * ds.image_size ** 2
    card = make_record(
        "latents", {"format": "vq-codes-uint16" if ae.card["ae_kind"] == "vqvae" else "float16"},
        {"dataset": {"uri": ds.uri, "version": ds.version}, "autoencoder": ref}, uri=uri,
        autoencoder={**ref, "scale_factor": ae.scale_factor, "kind": ae.card["ae_kind"],
                     "latent_shape": list(ae.latent)},
        shards=shards, counts=counts, total_images=total, pixel_bytes_total=pixel_bytes,
        latent_bytes_total=latent_bytes, bytes_saved=pixel_bytes - latent_bytes,
        tar_bytes_latents=sum((work / n).stat().st_size for names in shards.values() for n in names),
        tar_bytes_images=sum(len(storage.read_bytes(u)) for s in shards for u in ds.shard_uris(s)),
        **(extra or {}))
    storage.write_json(str(work / RECORD), card)
    if storage.is_remote(uri):
        storage.publish_dir(work, uri, last=(RECORD,))
    return uri, card


def load_latents(uri: str, split: str, ae: TrainedAutoencoder) -> tuple[torch.Tensor, torch.Tensor]:
    """All latents of a split, scaled: (N, C_lat, h, w) float32 and labels (N,) long."""
    rec = storage.read_json(storage.join(uri, RECORD))
    zs, ys = [], []
    for name in rec["shards"][split]:
        for s in iter_shard(storage.join(uri, name)):
            zs.append(np.load(io.BytesIO(s["npy"]), allow_pickle=False))
            ys.append(int(s["cls"]))
    z = torch.from_numpy(np.stack(zs))
    if rec["autoencoder"]["kind"] == "vqvae":
        with torch.no_grad():
            z = ae.net.embed(z.long().to(next(ae.net.parameters()).device)).cpu()  # (N, h, w) → (N, C_lat, h, w)
    return z.float() * ae.scale_factor, torch.tensor(ys, dtype=torch.long)


def latent_shard_batches(z: torch.Tensor, y: torch.Tensor, class_id: int | None, batch_size: int, seed: int,
                         start_step: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (z, y) batches from in-memory latents; a fresh order per (seed, start step, epoch),
    ranks take every world-th sample of the same order."""
    if class_id is not None:
        keep = y == class_id
        z, y = z[keep], y[keep]
    if len(z) < batch_size * world:
        raise MeddiffError(f"only {len(z)} latents for a batch of {batch_size} × {world} processes; "
                           "lower --batch-size")
    for epoch in itertools.count():
        g = torch.Generator().manual_seed(hash((seed, start_step, epoch)) & 0x7FFFFFFF)
        order = torch.randperm(len(z), generator=g)[rank::world]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield z[idx], y[idx]
