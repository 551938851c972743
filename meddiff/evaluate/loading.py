"""Images in, checked: a cohort's images in manifest order and a real dataset's splits, kept as
uint8 (converted to float per batch by whoever computes on them), plus the compatibility checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from meddiff import storage
from meddiff.data.cohorts import UNKNOWN_CLASS, Cohort
from meddiff.data.images import decode_png
from meddiff.data.shards import DatasetVersion, iter_shard
from meddiff.errors import ArtifactError, MeddiffError


@dataclass(frozen=True)
class Images:
    x: np.ndarray  # uint8 N×C×H×W
    y: np.ndarray  # int64 N (class ids)
    keys: list[str]  # sample keys

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> "Images":
        """The images at ``idx`` (a copy of those rows only)."""
        idx = np.asarray(idx, dtype=np.int64)
        return Images(self.x[idx], self.y[idx], [self.keys[i] for i in idx])


@dataclass(frozen=True)
class RealSplits:
    """The real data an evaluation compares with: ``train`` (the generator's training data),
    ``val`` (the real baseline: real images the generator never saw) and ``heldout`` (the held-out
    reference: the test split, never seen by the generator nor used for the baseline)."""
    train: Images
    val: Images
    heldout: Images


def _stack(xs: list[np.ndarray]) -> np.ndarray:
    """uint8 images → one preallocated N×C×H×W array (no intermediate float copy)."""
    out = np.empty((len(xs), *xs[0].shape), np.uint8)
    for i, x in enumerate(xs):
        out[i] = x
    return out


def load_images(shard_uris: list[str]) -> Images:
    """Every sample of the shards, in order: uint8 images, class ids, keys."""
    xs, ys, keys = [], [], []
    for uri in shard_uris:
        for s in iter_shard(uri):
            xs.append(decode_png(s["png"]))
            ys.append(int(s["cls"]))
            keys.append(s["__key__"])
    if not xs:
        return Images(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), [])
    return Images(_stack(xs), np.asarray(ys, np.int64), keys)


def load_real(dataset: DatasetVersion, heldout_split: str = "test") -> RealSplits:
    """The dataset's train, val and held-out splits; a MeddiffError naming what is missing."""
    train, val = load_images(dataset.shard_uris("train")), load_images(dataset.shard_uris("val"))
    held = load_images(dataset.shard_uris(heldout_split)) if dataset.card["shards"].get(heldout_split) \
        else load_images([])
    check_evaluable(dataset.uri, {"train": len(train), "val": len(val), heldout_split: len(held)}, heldout_split)
    return RealSplits(train, val, held)


def check_evaluable(uri: str, counts: dict[str, int], heldout_split: str = "test") -> None:
    """A MeddiffError unless ``counts`` (images per split: a card's totals) hold ≥ 2 in train, val and held-out."""
    for name in ("train", "val", heldout_split):
        if counts.get(name, 0) < 2:
            raise MeddiffError(f"{uri} has {counts.get(name, 0)} {name} images; the evaluation needs ≥ 2 in each of "
                               f"train (reference), val (baseline) and {heldout_split} (held-out reference)")


def load_cohort_images(cohort: Cohort, manifest: pd.DataFrame) -> Images:
    """The cohort's images in manifest order; a clear ArtifactError when shards and manifest disagree."""
    if len(manifest) == 0:
        raise ArtifactError(f"{cohort.uri}: the manifest has no images")
    pos = {k: i for i, k in enumerate(manifest["key"])}
    x: np.ndarray | None = None
    seen = np.zeros(len(manifest), bool)
    for uri in cohort.shard_uris():
        if not storage.exists(uri):
            raise ArtifactError(f"cohort shard {uri} is missing")
        for s in iter_shard(uri):
            i = pos.get(s["__key__"])
            if i is None:
                continue
            img = decode_png(s["png"])
            if x is None:
                x = np.empty((len(manifest), *img.shape), np.uint8)  # decoded straight into place
            if img.shape != x.shape[1:]:
                raise ArtifactError(f"{cohort.uri}: image {s['__key__']} is {img.shape}, others {x.shape[1:]}")
            x[i], seen[i] = img, True
    if x is None or not seen.all():
        missing = list(manifest["key"][~seen])
        raise ArtifactError(f"{cohort.uri}: {len(missing)} manifest keys are not in the shards (e.g. {missing[:3]}); "
                            "the manifest is corrupt or the cohort incomplete")
    return Images(x, manifest["class_id"].to_numpy(np.int64).copy(), list(manifest["key"]))


def check_compatible(cohort: Cohort, manifest: pd.DataFrame, dataset: DatasetVersion, syn: Images) -> None:
    """Classes, class ids and image shape of the cohort must match the real dataset's."""
    if cohort.class_names != dataset.class_names:
        raise MeddiffError(f"cohort classes {cohort.class_names} do not match the real dataset's "
                           f"{dataset.class_names} ({dataset.uri}); pass the dataset the model was trained on")
    ids = manifest["class_id"].to_numpy()
    if cohort.unconditional:
        if (ids != -1).any() or (manifest["class_name"] != UNKNOWN_CLASS).any():
            raise ArtifactError(f"{cohort.uri}: an unconditional cohort's manifest must have class_id -1 and "
                                f"class_name {UNKNOWN_CLASS!r} on every row")
    elif ids.min() < 0 or ids.max() >= dataset.num_classes:
        raise ArtifactError(f"{cohort.uri}: manifest class ids outside 0..{dataset.num_classes - 1}")
    else:
        names = np.asarray(dataset.class_names, dtype=object)[ids]
        if (names != manifest["class_name"].to_numpy(dtype=object)).any():
            raise ArtifactError(f"{cohort.uri}: manifest class_name disagrees with class_id")
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    if tuple(syn.x.shape[1:]) != shape:
        raise MeddiffError(f"cohort images are {tuple(syn.x.shape[1:])} (C×H×W), the real dataset's {shape}")
