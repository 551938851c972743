"""Training batches streamed from a dataset version's WebDataset shards.

Each DDP rank reads a disjoint part of the data: whole shards when there are at least as many
shards as ranks (``split_by_node``), otherwise every world_size-th sample. The stream repeats
epoch after epoch with a fresh shuffle seed derived from (seed, rank, start step, epoch), so a
resumed run keeps going without replaying the batches it already saw.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from .shards import DatasetVersion


@dataclass(frozen=True)
class DataSpec:
    """What to read and how: resolved from the training config."""

    split: str = "train"  # dataset split to train on
    class_id: int | None = None  # per-class part: keep only this class; None = all classes
    hflip: bool = False  # random horizontal flips (only where the domain is left-right symmetric)
    vflip: bool = False  # random vertical flips (only where the domain allows it)
    shuffle_buffer: int = 2_000  # sample-level shuffle buffer


def _samples(ds: DatasetVersion, spec: DataSpec, seed: int, rank: int, world: int) -> Iterator[tuple]:
    shards = ds.shard_uris(spec.split)
    by_shard = len(shards) >= world
    pipe = ds.pipeline(spec.split, shuffle_shards=True, shuffle_buffer=spec.shuffle_buffer, seed=seed,
                       split_by_node=by_shard, split_by_worker=False)
    it = iter(pipe)
    if world > 1 and not by_shard:
        it = itertools.islice(it, rank, None, world)
    if spec.class_id is not None:
        it = (s for s in it if s[1] == spec.class_id)
    return it


def batches(ds: DatasetVersion, spec: DataSpec, batch_size: int, seed: int, start_step: int,
            rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y): x (B, C, H, W) float32 in [-1, 1], y (B,) long; B = this rank's batch."""
    buf_x: list[torch.Tensor] = []
    buf_y: list[int] = []
    for epoch in itertools.count():
        epoch_seed = hash((seed, rank, start_step, epoch)) & 0x7FFFFFFF
        flips = torch.Generator().manual_seed(epoch_seed)
        n = 0
        for img, label in _samples(ds, spec, epoch_seed, rank, world):
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
