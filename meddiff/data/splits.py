"""Which split each image of a zip/folder/Kaggle source goes to, and the card's record of the rule.

Published split folders (``train/``, ``test/``) are kept, a split they lack carved from train; otherwise a
seeded split stratified by class. Groups (a patient, a lesion, a multi-frame file's frames: by a label
table's column, a pattern on the path, or the file) never straddle two splits. MedMNIST's official splits
are kept as published.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import numpy as np

from meddiff.data.sources import SourceData

if TYPE_CHECKING:
    from meddiff.data.ingest import IngestConfig


def stratified_split(labels: np.ndarray, seed: int, val_frac: float, test_frac: float) -> np.ndarray:
    """Per class, a seeded permutation cut into test / val / train. Returns split names (N,)."""
    out = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test, n_val = round(len(idx) * test_frac), round(len(idx) * val_frac)
        out[idx[:n_test]] = "test"
        out[idx[n_test:n_test + n_val]] = "val"
        out[idx[n_test + n_val:]] = "train"
    return out


def grouped_split(labels: np.ndarray, seed: int, val_frac: float, test_frac: float, groups: np.ndarray
                  ) -> np.ndarray:
    """Whole groups (patients, lesions) to test / val / train, class by class: a group goes with its most
    frequent class, the class's groups in a seeded order fill test, then val, to their share of its images.
    No group is in two splits. labels, groups (N,); returns split names (N,)."""
    import pandas as pd

    frame = pd.DataFrame({"label": labels, "group": groups})
    sizes = frame.groupby("group").size().to_dict()
    per_class = frame.groupby(["group", "label"]).size().reset_index(name="n")
    major = (per_class.sort_values(["group", "n", "label"], ascending=[True, False, True])  # ties: lower class id
             .drop_duplicates("group").set_index("group")["label"].to_dict())
    order = sorted(sizes)
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    split_of: dict[str, str] = {}
    for c in np.unique(labels):
        mine = [g for g in order if major[g] == c]
        total = sum(sizes[g] for g in mine)
        want = {"test": round(total * test_frac), "val": round(total * val_frac)}
        have = {"test": 0, "val": 0}
        for g in mine:
            split = next((s for s in ("test", "val") if have[s] < want[s]), "train")
            split_of[g] = split
            if split != "train":
                have[split] += sizes[g]
    return frame["group"].map(split_of).to_numpy(dtype=object)


def carve_splits(labels: np.ndarray, given: np.ndarray, seed: int, val_frac: float, test_frac: float,
                 groups: np.ndarray | None = None) -> np.ndarray:
    """Published splits ``given`` (N,) kept; a split they lack (val or test) is carved from each class's train
    images, ``val_frac`` / ``test_frac`` of them (whole ``groups`` when given). Returns split names (N,)."""
    out = given.copy()
    train = np.flatnonzero(given == "train")
    present = set(given)
    fracs = {split: 0.0 if split in present else frac for split, frac in (("val", val_frac), ("test", test_frac))}
    split = stratified_split if groups is None else functools.partial(grouped_split, groups=groups[train])
    out[train] = split(labels[train], seed=seed, val_frac=fracs["val"], test_frac=fracs["test"])
    return out


def _groups(src: SourceData, cfg: IngestConfig) -> tuple[np.ndarray | None, dict]:
    """Each sample's group (patient) by --group-column or --group-pattern, and the card's words for it; a
    sample without one is a group of its own, or of its file's frames (--frames all: a volume or a clip's
    frames are never split apart)."""
    file = [s.source_id.rpartition("#")[0] if s.frame is not None else s.source_id for s in src.samples]
    if cfg.group_column is not None:
        found = [s.group for s in src.samples]
        how = f"grouped by column {cfg.group_column!r}"
    elif cfg.group_pattern is not None:
        pattern = re.compile(cfg.group_pattern)
        matches = [pattern.search(path) for path in file]
        found = [(m.group(1) if pattern.groups else m.group(0)) if m else None for m in matches]
        how = f"grouped by pattern {cfg.group_pattern!r} on each file's path"
    elif any(s.frame is not None for s in src.samples):
        found, how = [None] * len(file), "grouped by file (--frames all)"
    else:
        return None, {}
    groups = np.array([g if g is not None else f"\0{path}" for g, path in zip(found, file)], dtype=object)
    alone = len({path for g, path in zip(found, file) if g is None}) if cfg.group_column or cfg.group_pattern else 0
    return groups, {"groups": {"rule": f"{how}: each group's images in one split", "groups": len(set(groups)),
                               "images_without_group": alone}}


def assign_splits(src: SourceData, cfg: IngestConfig) -> tuple[np.ndarray, dict]:
    """Each sample's split, and the card's record of how it was chosen."""
    labels = np.array([s.label for s in src.samples])
    given = np.array([s.split for s in src.samples], dtype=object)
    if src.has_official_splits:
        return given, {"rule": "official splits, as published"}
    groups, grouped = _groups(src, cfg)
    if src.split_folders and cfg.splits == "auto":
        carved = [f"{split}: --{split}-frac {frac:g} of each class's train images (--split-seed {cfg.split_seed})"
                  for split, frac in (("test", cfg.test_frac), ("val", cfg.val_frac)) if split not in src.split_folders]
        return (carve_splits(labels, given, cfg.split_seed, cfg.val_frac, cfg.test_frac, groups),
                {"rule": "published split folders kept", "folders": src.split_folders,
                 **({"carved": carved} if carved else {}), **grouped})
    rule = (f"stratified per class: --val-frac {cfg.val_frac:g}, --test-frac {cfg.test_frac:g}, "
            f"--split-seed {cfg.split_seed}")
    split = stratified_split if groups is None else functools.partial(grouped_split, groups=groups)
    return (split(labels, seed=cfg.split_seed, val_frac=cfg.val_frac, test_frac=cfg.test_frac),
            {"rule": rule, **({"folders_pooled": src.split_folders} if src.split_folders else {}), **grouped})
