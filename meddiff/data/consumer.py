"""For downstream ML teams: a torch ``IterableDataset`` over a cohort or a real dataset version.

    from meddiff.data.consumer import ShardDataset
    ds = ShardDataset("storage/cohorts/<id>", classes=["neutrophil"], mix_with="storage/datasets/bloodmnist/<v>",
                      mix_ratio=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=128, num_workers=4)

Yields (float32 (C, H, W) in [0, 1], class id). Cohort samples are filtered through the manifest
(classes; flagged images are excluded by default once ``meddiff evaluate --drop-flagged`` has
asked for it); real samples through ``index.parquet``. Class ids are shared: a cohort's classes
are its model's dataset's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from meddiff import storage
from meddiff.errors import MeddiffError
from meddiff.data.shards import _to_tensor_label, iter_shard


@dataclass(frozen=True)
class _Source:
    """The shards of one artifact and the keys to take from them."""

    shard_uris: list[str]
    keys: frozenset[str]
    class_names: list[str]


def _class_ids(classes: Sequence[str | int] | None, names: list[str]) -> set[int] | None:
    if classes is None:
        return None
    out = set()
    for c in classes:
        if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
            out.add(int(c))
        elif c in names:
            out.add(names.index(c))
        else:
            raise MeddiffError(f"unknown class {c!r}; classes are {names}")
    return out


def _cohort_source(uri: str, classes, exclude_flagged: bool | None) -> _Source:
    from meddiff.data.cohorts import open_cohort

    cohort = open_cohort(uri)
    df = cohort.manifest()
    if exclude_flagged is None:  # the evaluation's --drop-flagged decides the default
        report = storage.join(uri, "report.json")
        exclude_flagged = bool(storage.exists(report) and storage.read_json(report).get("drop_flagged"))
    ids = _class_ids(classes, cohort.class_names)
    if ids is not None:
        df = df[df["class_id"].isin(ids)]
    if exclude_flagged:
        df = df[~df["flagged"].fillna(False).astype(bool)]
    return _Source(cohort.shard_uris(), frozenset(df["key"]), cohort.class_names)


def _dataset_source(uri: str, split: str, classes, n: int | None = None, seed: int = 0) -> _Source:
    from meddiff.data.shards import open_dataset

    ds = open_dataset(uri)
    idx = ds.index()
    idx = idx[idx["split"] == split]
    ids = _class_ids(classes, ds.class_names)
    if ids is not None:
        idx = idx[idx["label"].isin(ids)]
    keys = idx["key"].to_numpy()
    if n is not None:
        if n > len(keys):
            raise MeddiffError(f"mix_ratio asks for {n} real images but {uri} ({split}) has {len(keys)}")
        keys = np.random.default_rng(seed).choice(keys, size=n, replace=False)
    return _Source(ds.shard_uris(split), frozenset(keys.tolist()), ds.class_names)


def open_source(uri: str, split: str = "train", classes=None, exclude_flagged: bool | None = None) -> _Source:
    if storage.exists(storage.join(uri, "cohort.json")):
        return _cohort_source(uri, classes, exclude_flagged)
    return _dataset_source(uri, split, classes)


class ShardDataset(IterableDataset):
    """(image (C, H, W) float32 in [0, 1], class id) from a cohort or dataset version, optionally mixed."""

    def __init__(self, uri: str, *, split: str = "train", classes: Sequence[str | int] | None = None,
                 exclude_flagged: bool | None = None, mix_with: str | None = None, mix_ratio: float = 0.0,
                 mix_split: str = "train", seed: int = 0):
        """
        uri: cohort or dataset version. split: dataset split (ignored for cohorts).
        classes: names or ids to keep (None = all). exclude_flagged: drop memorization-flagged
        cohort images (None = as the evaluation's --drop-flagged decided).
        mix_with: a real dataset version to mix in; mix_ratio: fraction of the yielded images that
        are real (0 ≤ r < 1), e.g. 0.5 = as many real as synthetic. seed: which real images and
        the interleaving order.
        """
        if not 0 <= mix_ratio < 1:
            raise MeddiffError(f"mix_ratio must be in [0, 1), got {mix_ratio}")
        self.primary = open_source(uri, split, classes, exclude_flagged)
        self.mixed: _Source | None = None
        if mix_with is not None and mix_ratio > 0:
            n_real = round(len(self.primary.keys) * mix_ratio / (1 - mix_ratio))
            self.mixed = _dataset_source(mix_with, mix_split, classes, n_real, seed)
            if self.mixed.class_names != self.primary.class_names:
                raise MeddiffError(f"cannot mix {mix_with}: its classes {self.mixed.class_names} differ from "
                                   f"{self.primary.class_names}")
        self.seed = seed
        self.class_names = self.primary.class_names

    def __len__(self) -> int:
        return len(self.primary.keys) + (len(self.mixed.keys) if self.mixed else 0)

    @staticmethod
    def _stream(src: _Source, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        for uri in src.shard_uris[worker::workers]:
            for s in iter_shard(uri):
                if s["__key__"] in src.keys:
                    yield s

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        streams = [self._stream(self.primary, worker, workers)]
        if self.mixed is not None:
            streams.append(self._stream(self.mixed, worker, workers))
        rng = np.random.default_rng([self.seed, worker])
        live = list(range(len(streams)))
        weights = [len(self.primary.keys)] + ([len(self.mixed.keys)] if self.mixed else [])  # interleave ∝ sizes
        while live:
            p = np.array([weights[i] for i in live], dtype=float)
            i = live[int(rng.choice(len(live), p=p / p.sum()))] if p.sum() > 0 else live[0]
            try:
                yield _to_tensor_label(next(streams[i]))
            except StopIteration:
                live.remove(i)
