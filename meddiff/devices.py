"""One device resolver for every stage: ``auto | cpu | cuda | cuda:N``, DDP ranks, the CPU fallback.

Rules (the same for train, generate, evaluate, the pipeline and the flows):

* ``auto`` → ``cuda`` when a CUDA GPU is visible, else ``cpu``.
* ``cuda`` / ``cuda:N`` without a GPU → :class:`DeviceUnavailableError` (one message, naming how to
  fix it), or ``cpu`` when ``allow_cpu_fallback`` is set.
* Under ``torchrun`` (``world > 1``) rank r binds to GPU ``N + local_rank`` (``cuda`` = ``cuda:0``),
  so ``--device cuda:0`` no longer puts every rank on GPU 0; an index past the visible GPUs fails.
* ``part_device`` spreads parallel per-class parts round-robin over the visible GPUs.
"""

from __future__ import annotations

import os
import re
import warnings

import torch

from meddiff.errors import MeddiffError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceUnavailableError(MeddiffError):
    """A GPU was asked for on a machine (or worker) that has none."""


def check_device(requested: str) -> str:
    """Validate a device string up front (configs call this in ``check()``)."""
    if not isinstance(requested, str) or not DEVICE_PATTERN.fullmatch(requested):
        raise MeddiffError(f"device must be auto, cpu, cuda or cuda:<N>, not {requested!r}")
    return requested


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str = "auto", *, allow_cpu_fallback: bool = False, fallback_switch: str | None = None,
                   local_rank: int = 0, world: int = 1, device_count: int | None = None) -> torch.device:
    """The ``torch.device`` this process should use for ``requested``.

    ``fallback_switch``: how the caller's user turns ``allow_cpu_fallback`` on, named in the no-GPU error
    (None: the caller has no such switch, and the error does not offer one).
    ``local_rank``/``world``: this process's place under torchrun (defaults: a single process).
    ``device_count``: visible GPUs (default: asked from torch; tests pass a fake count).
    """
    check_device(requested)
    count = cuda_count() if device_count is None else device_count
    if requested == "auto":
        requested = "cuda" if count else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if count == 0:
        if allow_cpu_fallback:
            warnings.warn(f"device {requested!r} requested but no CUDA GPU is visible: running on the CPU "
                          "(allow_cpu_fallback)", stacklevel=2)
            return torch.device("cpu")
        raise DeviceUnavailableError(
            f"CUDA was requested (device {requested!r}) but no CUDA GPU is visible on this machine "
            f"(host {os.uname().nodename}): use device 'cpu' or 'auto', or run it on a GPU worker (the 'gpu' work "
            "pool)" + (f", or allow the CPU fallback ({fallback_switch})" if fallback_switch else ""))
    base = int(requested.split(":")[1]) if ":" in requested else 0
    index = base + (local_rank if world > 1 else 0)
    if index >= count:
        raise DeviceUnavailableError(
            f"device {requested!r} for local rank {local_rank} needs GPU {index}, but only {count} GPU(s) are "
            "visible (CUDA_VISIBLE_DEVICES); start fewer processes or pick a lower index")
    return torch.device("cuda", index)


def part_device(requested: str, part_index: int, device_count: int | None = None) -> str:
    """Device of the ``part_index``-th of several parts trained side by side in one process.

    ``cuda`` spreads parts round-robin over the visible GPUs (part k → ``cuda:k mod count``);
    an explicit ``cuda:N``, ``cpu`` or ``auto`` without GPUs is kept as given.
    """
    check_device(requested)
    count = cuda_count() if device_count is None else device_count
    if requested in ("cuda", "auto") and count:
        return f"cuda:{part_index % count}"
    return requested


def bind(device: torch.device) -> None:
    """Make ``device`` this process's current CUDA device (NCCL and CUDA kernels use the current one)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
