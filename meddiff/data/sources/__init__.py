"""Dataset sources named by a URI: ``medmnist:<flag>``, ``kaggle:<owner>/<slug>``, ``zip:<path>``, ``folder:<path>``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from meddiff.errors import SourceError

SourceKind = Literal["medmnist", "kaggle", "zip", "folder"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SourceRef:
    kind: SourceKind
    target: str  # flag, owner/slug, or path

    @property
    def uri(self) -> str:
        return f"{self.kind}:{self.target}"


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
    """One input image before preprocessing. ``payload`` is an array (MedMNIST) or file bytes."""

    label: int
    source_id: str
    payload: np.ndarray | bytes
    split: Split | None = None  # official split when the source has one


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
