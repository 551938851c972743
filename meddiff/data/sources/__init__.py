"""Dataset sources named by a URI: ``medmnist:<flag>``, ``kaggle:<owner>/<slug>``, ``zip:<path>``, ``folder:<path>``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, get_args

import numpy as np

from meddiff.errors import SourceError, check_folder_name

SourceKind = Literal["medmnist", "kaggle", "zip", "folder"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SplitRule = Literal["auto", "random"]  # zip/folder/Kaggle: published split folders kept, or one stratified split


def check_name(given: str) -> str:
    """``--name`` as given, or a SourceError (a name is never altered)."""
    return check_folder_name(given, "--name", "datasets/<name>/", SourceError)


def dataset_name(given: str | None, derived: str, source: str) -> str:
    """``--name`` if given (checked), else the source's name made a safe folder name
    ("my scans (2)" → "my-scans-2"). Raises SourceError when neither is usable."""
    if given is not None:
        return check_name(given)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", derived).strip("-._")[:64]
    if not name:
        raise SourceError(f"cannot name a dataset after {source!r} (its name {derived!r} has no letters or digits); "
                          f"pass --name")
    return name


@dataclass(frozen=True)
class SourceRef:
    kind: SourceKind
    target: str  # flag, owner/slug, or path

    @property
    def uri(self) -> str:
        return f"{self.kind}:{self.target}"

    @property
    def default_name(self) -> str:
        """The dataset's name unless ``--name`` says otherwise: the MedMNIST flag (ingest adds ``_<size>``
        above 28 px), the Kaggle slug, the archive's stem, the folder's name."""
        if self.kind == "kaggle":
            return self.target.split("/")[1]
        if self.kind in ("zip", "folder"):  # absolute, so "folder:." and "folder:scans/.." are named too
            path = Path(os.path.abspath(Path(self.target).expanduser()))
            return path.stem if self.kind == "zip" else path.name
        return self.target


def parse_source(uri: str) -> SourceRef:
    """``medmnist:bloodmnist`` → SourceRef('medmnist', 'bloodmnist'); checked up front."""
    kind, sep, target = uri.partition(":")
    if not sep or not target or kind not in get_args(SourceKind):
        raise SourceError(
            f"unknown source {uri!r}: use medmnist:<flag>, kaggle:<owner>/<slug>, zip:<path> or folder:<path>"
        )
    if kind == "kaggle" and target.count("/") != 1:
        raise SourceError(f"kaggle source must be kaggle:<owner>/<slug>, got {uri!r}")
    return SourceRef(kind, target)  # type: ignore[arg-type]


@dataclass
class RawSample:
    """One input image before preprocessing. ``payload`` is an array (MedMNIST), file bytes, or a function
    reading them (zip members and folder files: read when needed, never all held in memory at once)."""

    label: int
    source_id: str
    payload: np.ndarray | bytes | Callable[[], bytes]
    split: Split | None = None  # official split when the source has one
    group: str | None = None  # a label table's patient/lesion id: a group's images share one split
    frame: int | None = None  # the page/frame of a multi-frame file this sample is (--frames all); None = one

    def data(self) -> bytes:
        """The file's bytes (not for MedMNIST arrays)."""
        return self.payload() if callable(self.payload) else self.payload  # type: ignore[return-value]


@dataclass
class SourceData:
    """Everything a source yields: samples plus the facts that go on the dataset card."""

    name: str
    class_names: list[str]
    samples: list[RawSample]
    checksums: dict[str, str]
    license: str | None = None
    has_official_splits: bool = False
    skipped: list[dict[str, str]] = field(default_factory=list)
    description: str = ""
    # zip/folder/Kaggle class folders inside published split folders: split → those folders (samples carry
    # their split); None for other layouts
    split_folders: dict[str, list[str]] | None = None
    label_table: dict | None = None  # labels read from a table (--labels): the card's record of it
