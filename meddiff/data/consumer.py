"""For downstream ML teams: torch datasets over a cohort or a real dataset version, reshuffled every epoch.

    from meddiff.data import ShardDataset
    ds = ShardDataset("storage/cohorts/<id>", classes=["neutrophil"], mix_with="storage/datasets/bloodmnist/<v>",
                      mix_ratio=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=128, num_workers=4)
    for epoch in range(epochs):
        ds.set_epoch(epoch)            # a fresh order every epoch (like DistributedSampler.set_epoch; persistent workers too)
        for x, y in loader: ...
    loader = torch.utils.data.DataLoader(ds.as_map(), batch_size=128, shuffle=True)   # random access

Yields (float32 (C, H, W) in [0, 1], class id). Cohort samples are filtered through the manifest
(classes; flagged images are excluded by default once ``meddiff evaluate --drop-flagged`` has
asked for it); real samples through ``index.parquet``. Class ids are shared: a cohort's classes
are its model's dataset's classes.

Epoch order: a permutation of the shards and of the samples inside each shard, seeded by
(seed, epoch); a mixed-in real set interleaves at random, in proportion to the sizes. Readers:
DDP rank r of W keeps every W-th sample of that order, and all ranks keep the same count (the
last N mod W samples are dropped, so no rank waits on another: DistributedSampler(drop_last=True));
DataLoader worker k of K reads whole shards k, k+K, ... of its rank's part (every K-th sample
when there are fewer shards than workers). Every sample is read exactly once per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from meddiff import storage
from meddiff.errors import ArtifactError, MeddiffError
from meddiff.data.shards import _to_tensor_label, iter_shard
from meddiff.data.sources import SPLITS

Entry = tuple[str, str]  # (shard URI, sample key)


@dataclass(frozen=True)
class _Source:
    """The samples of one artifact to read: (shard URI, key) in storage order."""

    uri: str
    entries: list[Entry]
    class_names: list[str]
    shape: tuple[int, int] | None = None  # (channels, side in px) of a dataset version; None for a cohort
    dataset_uri: str | None = None  # a cohort's dataset version (its images have that version's shape)

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(k for _, k in self.entries)


def _class_ids(classes: Sequence[str | int] | None, names: list[str]) -> set[int] | None:
    if classes is None:
        return None
    if isinstance(classes, (str, int)):  # one class: "neutrophil", not its letters
        classes = [classes]
    out = set()
    for c in classes:
        if c in names:
            out.add(names.index(c))
        elif isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
            if not 0 <= int(c) < len(names):
                raise MeddiffError(f"unknown class id {c}; ids are 0..{len(names) - 1} for {names}")
            out.add(int(c))
        else:
            raise MeddiffError(f"unknown class {c!r}; classes are {names}")
    return out


def _entries(uri: str, shards, keys) -> list[Entry]:
    return sorted((storage.join(uri, s), k) for s, k in zip(shards, keys))


def _cohort_source(uri: str, classes, exclude_flagged: bool | None) -> _Source:
    from meddiff.data.cohorts import open_cohort

    cohort = open_cohort(uri)
    df = cohort.manifest()
    if exclude_flagged is None:  # the evaluation's --drop-flagged decides the default
        report = storage.join(uri, "report.json")
        exclude_flagged = bool(storage.exists(report) and storage.read_json(report).get("drop_flagged"))
    ids = _class_ids(classes, cohort.class_names)
    if ids is not None and cohort.unconditional:
        raise MeddiffError(f"{uri} was sampled without labels (--unconditional): its class ids are all -1, so "
                           "classes= selects nothing; select by the manifest's oracle_class_id (after meddiff "
                           "evaluate) instead")
    if ids is not None:
        df = df[df["class_id"].isin(ids)]
    if exclude_flagged:
        df = df[~df["flagged"].fillna(False).astype(bool)]
    return _Source(cohort.uri, _entries(cohort.uri, df["shard"], df["key"]), cohort.class_names,
                   dataset_uri=cohort.dataset_uri)


def _shape(src: _Source) -> tuple[int, int] | None:
    """(channels, side) of a source's images; a cohort's from its dataset version's card, None when that
    card cannot be read here (a cohort copied away from the storage that made it)."""
    if src.shape is not None or src.dataset_uri is None:
        return src.shape
    from meddiff.data.shards import open_dataset

    try:
        ds = open_dataset(src.dataset_uri)
        return ds.channels, ds.image_size
    except Exception:  # noqa: BLE001 - gone, moved, or another machine's storage: the check is skipped
        return None


def _dataset_source(uri: str, split: str, classes, n: int | None = None, seed: int = 0,
                    n_primary: int = 0) -> _Source:
    """A dataset version's ``split`` (``classes`` only); ``n`` of its images drawn at random when given,
    to mix with ``n_primary`` others (named in the error when the split has fewer than ``n``)."""
    from meddiff.data.shards import open_dataset

    ds = open_dataset(uri)
    idx = ds.index()
    idx = idx[idx["split"] == split]
    ids = _class_ids(classes, ds.class_names)
    if ids is not None:
        idx = idx[idx["label"].isin(ids)]
    if n is not None:
        if n > len(idx):
            fits = math.floor(1000 * len(idx) / (len(idx) + n_primary)) / 1000  # round(n_primary·r/(1−r)) ≤ have
            raise MeddiffError(f"mix_ratio asks for {n} real images but {uri} ({split}) has {len(idx)}: "
                               f"mix_ratio ≤ {fits:g} fits them to these {n_primary} images")
        idx = idx.iloc[np.sort(np.random.default_rng(seed).choice(len(idx), size=n, replace=False))]
    return _Source(ds.uri, _entries(ds.uri, idx["shard"], idx["key"]), ds.class_names, (ds.channels, ds.image_size))


def open_source(uri: str, split: str = "train", classes=None, exclude_flagged: bool | None = None) -> _Source:
    if storage.exists(storage.join(uri, "cohort.json")):
        return _cohort_source(uri, classes, exclude_flagged)
    return _dataset_source(uri, split, classes)


class _ShardCache:
    """Raw samples of the shards being read, by key; a shard is dropped once its last wanted key is taken."""

    def __init__(self, entries: Sequence[Entry] | None = None):
        self.shards: dict[str, dict[str, dict[str, Any]]] = {}
        self.left: dict[str, int] | None = None
        if entries is not None:
            self.left = {}
            for shard, _ in entries:
                self.left[shard] = self.left.get(shard, 0) + 1

    def get(self, shard: str, key: str) -> tuple[torch.Tensor, int]:
        if shard not in self.shards:
            self.shards[shard] = {s["__key__"]: s for s in iter_shard(shard)}
        sample = self.shards[shard].get(key)
        if sample is None or "png" not in sample or "cls" not in sample:
            what = "is missing" if sample is None else f"lacks {sorted({'png', 'cls'} - set(sample))}"
            raise ArtifactError(f"{shard}: sample {key!r} {what}; the artifact is damaged, re-create it "
                                "(cohorts: `meddiff cohorts verify` lists every problem)")
        if self.left is not None:
            self.left[shard] -= 1
            if self.left[shard] == 0:
                del self.shards[shard]
        return _to_tensor_label(sample)


def epoch_order(sources: Sequence[_Source], seed: int, epoch: int) -> list[Entry]:
    """All entries of one epoch: shards and the samples inside each permuted, sources interleaved at random."""
    rng = np.random.default_rng([seed, epoch])
    streams = []
    for src in sources:
        by_shard: dict[str, list[str]] = {}
        for shard, key in src.entries:
            by_shard.setdefault(shard, []).append(key)
        shards = sorted(by_shard)
        order = []
        for s in rng.permutation(len(shards)):
            keys = by_shard[shards[s]]
            order += [(shards[s], keys[i]) for i in rng.permutation(len(keys))]
        streams.append(iter(order))
    picks = rng.permutation(np.repeat(np.arange(len(sources)), [len(s.entries) for s in sources]))
    return [next(streams[p]) for p in picks]  # interleaving ∝ sizes


def reader_part(order: list[Entry], rank: int, world: int, worker: int, workers: int) -> list[Entry]:
    """This (rank, worker)'s entries of an epoch's order: disjoint parts that cover it (ranks: equal sizes)."""
    if world > 1:
        order = order[rank::world][: len(order) // world]
    if workers <= 1:
        return order
    shards = list(dict.fromkeys(s for s, _ in order))  # in order of first use
    if len(shards) < workers:
        return order[worker::workers]
    mine = set(shards[worker::workers])
    return [e for e in order if e[0] in mine]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """(image (C, H, W) float32 in [0, 1], class id) from a cohort or dataset version, optionally mixed;
    reshuffled every epoch (``set_epoch``), split across DataLoader workers and DDP ranks."""

    def __init__(self, uri: str, *, split: str = "train", classes: Sequence[str | int] | None = None,
                 exclude_flagged: bool | None = None, mix_with: str | None = None, mix_ratio: float = 0.0,
                 mix_split: str = "train", seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 transform: Callable[[torch.Tensor], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None):
        """
        uri: cohort or dataset version. split: dataset split (ignored for cohorts).
        classes: names or ids to keep (None = all). exclude_flagged: drop memorization-flagged
        cohort images (None = as the evaluation's --drop-flagged decided).
        mix_with: a real dataset version to mix in; mix_ratio: fraction of the yielded images that
        are real (0 ≤ r < 1), e.g. 0.5 = as many real as synthetic. seed: which real images and
        every epoch's order. rank/world_size: this DDP process (None = torch.distributed's, else 0 of 1).
        transform / target_transform: applied to each image (C, H, W) float32 in [0, 1] / class id as it
        is yielded, in the DataLoader worker (as torchvision datasets do), e.g. augmentations.
        """
        if not 0 <= mix_ratio < 1:
            raise MeddiffError(f"mix_ratio must be in [0, 1), got {mix_ratio}")
        if (mix_with is None) != (mix_ratio == 0):  # else one of them is silently ignored: nothing mixed in
            raise MeddiffError(f"mix_with={mix_with!r} with mix_ratio={mix_ratio}: give both to mix real images in "
                               "(mix_ratio = the real fraction, e.g. 0.5 = as many real as synthetic), or neither")
        for name, value in (("split", split), ("mix_split", mix_split)):
            if value not in SPLITS:
                raise MeddiffError(f"{name} must be one of {', '.join(SPLITS)}, got {value!r}")
        self.primary = open_source(uri, split, classes, exclude_flagged)
        if not self.primary.entries:  # else a loader that silently yields nothing
            raise MeddiffError(f"no images in {uri} with split={split!r}, classes={classes!r}, exclude_flagged="
                               f"{exclude_flagged!r} (split applies to dataset versions only)")
        self.mixed: _Source | None = None
        if mix_with is not None:
            n_real = round(len(self.primary.entries) * mix_ratio / (1 - mix_ratio))
            self.mixed = _dataset_source(mix_with, mix_split, classes, n_real, seed, len(self.primary.entries))
            if self.mixed.class_names != self.primary.class_names:
                raise MeddiffError(f"cannot mix {mix_with}: its classes {self.mixed.class_names} differ from "
                                   f"{self.primary.class_names}")
            shapes = _shape(self.primary), self.mixed.shape
            if None not in shapes and shapes[0] != shapes[1]:
                (c1, s1), (c2, s2) = shapes  # else a collate error mid-epoch
                raise MeddiffError(f"cannot mix {mix_with}: its images are {c2}×{s2}×{s2} (channels×px), {uri}'s "
                                   f"{c1}×{s1}×{s1}; mix a version ingested at the same --size and channels")
        self.seed = seed
        # in shared memory: persistent DataLoader workers hold a copy of this dataset made at their start, and
        # must still see set_epoch (a plain int would freeze them on the epoch they started with)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.rank, self.world_size = rank, world_size
        self.class_names = self.primary.class_names
        self.transform, self.target_transform = transform, target_transform

    @property
    def sources(self) -> list[_Source]:
        return [self.primary] + ([self.mixed] if self.mixed else [])

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows (call before each epoch); DataLoader
        workers see it too, persistent ones included."""
        self._epoch.fill_(int(epoch))

    def _rank_world(self) -> tuple[int, int]:
        rank, world = _dist()
        return (rank if self.rank is None else self.rank), (world if self.world_size is None else self.world_size)

    def __getstate__(self) -> dict:
        """Sent to spawned DataLoader workers: they have no process group, so this rank is fixed here, in
        the process that has one (else every rank's workers would read the whole epoch)."""
        rank, world = self._rank_world()
        return {**self.__dict__, "rank": rank, "world_size": world}

    def __len__(self) -> int:
        """Samples this rank yields per epoch (all ranks equal)."""
        return sum(len(s.entries) for s in self.sources) // self._rank_world()[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = self._rank_world()
        part = reader_part(epoch_order(self.sources, self.seed, self.epoch), rank, world, worker, workers)
        cache = _ShardCache(part)
        for shard, key in part:
            yield _transformed(cache.get(shard, key), self.transform, self.target_transform)

    def as_map(self) -> "ShardMapDataset":
        """The same samples as a map-style dataset (random access; ``DataLoader(shuffle=True)``)."""
        return ShardMapDataset([e for s in self.sources for e in s.entries], self.class_names, self.transform,
                               self.target_transform)


def _transformed(item: tuple[torch.Tensor, int], transform, target_transform) -> tuple[Any, Any]:
    x, y = item
    return (x if transform is None else transform(x)), (y if target_transform is None else target_transform(y))


class ShardMapDataset(Dataset):
    """Random access to shard samples: item i = (image (C, H, W) float32 in [0, 1], class id).

    Shards are read whole on first use and kept in memory (per DataLoader worker): meant for cohorts
    and small datasets. Use ``ShardDataset(...).as_map()`` to build one."""

    def __init__(self, entries: list[Entry], class_names: list[str],
                 transform: Callable[[torch.Tensor], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None):
        self.entries, self.class_names = list(entries), list(class_names)
        self.transform, self.target_transform = transform, target_transform  # as ShardDataset's
        self._cache: _ShardCache | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._cache is None:
            self._cache = _ShardCache()
        return _transformed(self._cache.get(*self.entries[i]), self.transform, self.target_transform)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # workers read their own copies
