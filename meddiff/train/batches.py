"""Training batches streamed from a dataset version's WebDataset shards.

One pass (epoch) of the stream: the shard list is shuffled with a seed equal on every rank; each
DataLoader worker reads whole shards (``split_by_worker``); each DDP rank keeps every
world_size-th raw sample of that stream *before* decoding (so ranks see disjoint, equally sized
parts whatever the shard sizes, and never decode what they drop); per-class parts keep one class,
also before decoding; then a sample shuffle buffer and PNG decoding. Passes repeat endlessly with
seeds derived from (seed, start step, epoch), so a resumed run continues on fresh orderings
instead of replaying the batches it already saw.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import webdataset as wds

from meddiff import storage
from meddiff.data.images import decode_png
from meddiff.data.shards import DatasetVersion


@dataclass(frozen=True)
class DataSpec:
    """What to read and how: resolved from the training config."""

    split: str = "train"  # dataset split to train on
    class_id: int | None = None  # per-class part: keep only this class; None = all classes
    hflip: bool = False  # random horizontal flips (only where the domain is left-right symmetric)
    vflip: bool = False  # random vertical flips (only where the domain allows it)
    shuffle_buffer: int = 2_000  # sample-level shuffle buffer
    num_workers: int = 0  # DataLoader processes reading + decoding (capped at the shard count)


def _open_streams(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for sample in src:  # local paths and s3:// alike
        fs, path = storage.filesystem(sample["url"])
        with fs.open(path, "rb") as stream:
            yield {**sample, "stream": stream}


def _every(n: int, i: int) -> Callable[[Iterable], Iterator]:
    def stage(src: Iterable) -> Iterator:
        return itertools.islice(src, i, None, n)  # positions i, i+n, i+2n, ...
    return stage


def _of_class(class_id: int) -> Callable[[Iterable], Iterator]:
    def stage(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return (s for s in src if int(s["cls"]) == class_id)
    return stage


def _decode(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    return torch.from_numpy(decode_png(sample["png"])).float().div_(255.0), int(sample["cls"])  # (C, H, W) in [0, 1]


def one_pass(ds: DatasetVersion, spec: DataSpec, seed: int, rank: int, world: int) -> Iterable[tuple]:
    """This rank's part of one shuffled pass: (float32 (C, H, W) in [0, 1], class id). ``seed``: same on all ranks."""
    shards = ds.shard_uris(spec.split)
    workers = min(spec.num_workers, len(shards))
    stages: list[Any] = [wds.SimpleShardList(shards, seed=seed)]
    if workers:
        stages.append(wds.split_by_worker)
    stages += [_open_streams, wds.tariterators.tar_file_expander, wds.tariterators.group_by_keys]
    if world > 1:
        stages.append(_every(world, rank))
    if spec.class_id is not None:
        stages.append(_of_class(spec.class_id))
    if spec.shuffle_buffer:
        stages.append(wds.shuffle(spec.shuffle_buffer, initial=min(spec.shuffle_buffer, 1000),
                                  rng=random.Random(seed * 7919 + rank)))
    stages.append(wds.map(_decode))
    if not workers:
        return wds.DataPipeline(*stages)
    stages.append(wds.batched(256, collation_fn=_collate, partial=True))  # few large IPC messages
    loader = torch.utils.data.DataLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed * 7919 + rank))  # not torch's
    # global stream: parts trained side by side in threads must not draw from each other's (meddiff.train.loop)
    return ((x, int(y)) for xs, ys in loader for x, y in zip(xs, ys))


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])  # (n, C, H, W), (n,)


def batches(ds: DatasetVersion, spec: DataSpec, batch_size: int, seed: int, start_step: int,
            rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y): x (B, C, H, W) float32 in [-1, 1], y (B,) long; B = this rank's batch."""
    buf_x: list[torch.Tensor] = []
    buf_y: list[int] = []
    for epoch in itertools.count():
        epoch_seed = hash((seed, start_step, epoch)) & 0x7FFFFFFF  # the same on every rank
        flips = torch.Generator().manual_seed(epoch_seed + rank)
        n = 0
        for img, label in one_pass(ds, spec, epoch_seed, rank, world):
            n += 1
            if spec.hflip and torch.rand((), generator=flips) < 0.5:
                img = img.flip(-1)
            if spec.vflip and torch.rand((), generator=flips) < 0.5:
                img = img.flip(-2)
            buf_x.append(img)
            buf_y.append(label)
            if len(buf_x) == batch_size:
                x = torch.stack(buf_x).mul_(2).sub_(1)  # B × (C, H, W) → (B, C, H, W), [0, 1] → [-1, 1]
                yield x, torch.tensor(buf_y, dtype=torch.long)
                buf_x, buf_y = [], []
        if n == 0:
            raise RuntimeError("the training stream is empty")  # guarded by the caller's up-front checks
