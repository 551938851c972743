"""Training checkpoints: written atomically, rotated; resumed from (see ``load_checkpoint``).

A run folder ``<root>/models/<run-id>/`` (or its ``class-<i>/`` parts) holds
``checkpoints/step-XXXXXXX.pt``. Each checkpoint is written to a temp file in the same folder,
fsynced and renamed, so a killed writer never leaves a partial file under a checkpoint name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meddiff import storage
from meddiff.models.trained import CHECKPOINT_FORMAT, load_checkpoint  # noqa: F401  (the reader lives with the loader)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a local run folder, oldest first (temp files are ignored)."""
    d = run_dir / CHECKPOINT_DIR
    return sorted(d.glob("step-*.pt")) if d.is_dir() else []


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/step-<step>.pt``; keep the ``keep`` newest."""
    d = run_dir / CHECKPOINT_DIR
    d.mkdir(parents=True, exist_ok=True)
    dest = d / checkpoint_name(step)
    with storage.atomic_file(dest) as f:
        torch.save({"format": CHECKPOINT_FORMAT, "step": step, **state}, f)
    for old in list_checkpoints(run_dir)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    for stale in d.glob(".step-*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    return dest
