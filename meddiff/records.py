"""Provenance records: versions, hashes and the JSON card written beside every artifact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from meddiff import __version__

_TRACKED = ("torch", "torchvision", "monai", "numpy", "webdataset", "medmnist", "pyarrow",
            "torchmetrics", "prefect")


def versions() -> dict[str, str]:
    """Versions of meddiff, Python and the libraries whose behaviour shapes an artifact."""
    out = {"meddiff": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (``algorithm``: any hashlib name, e.g. sha256, md5)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def to_jsonable(obj: Any) -> Any:
    """Dataclasses/tuples/paths to plain JSON types (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def content_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able object (canonical JSON, sorted keys)."""
    blob = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def make_record(kind: str, config: Any, inputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The common head of every artifact card: kind, config, input hashes, versions, time."""
    return {
        "kind": kind,
        "schema_version": 1,
        "created_at": now_iso(),
        "versions": versions(),
        "config": to_jsonable(config),
        "inputs": to_jsonable(inputs),
        **to_jsonable(fields),
    }
