"""DDP plumbing for ``torchrun``: process group from the environment, rank info, reductions.

Launch: ``torchrun --nproc_per_node N -m meddiff.train DATASET_URI ...``. gloo on CPU, nccl on CUDA.
Without torchrun (no ``WORLD_SIZE`` > 1) everything degrades to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank
    world: int  # number of processes
    local_rank: int  # rank on this node (selects the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """The global rank torchrun assigned to this process (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_info() -> DistInfo:
    """This process's place as torchrun describes it in the environment (before joining the group)."""
    return DistInfo(env_rank(), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))


def ensure_process_group(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (once); single-process info without torchrun.

    On CUDA the process is bound to ``device`` first and NCCL is told so (``device_id``): without it
    NCCL guesses the GPU from the rank and warns that collectives may hang.
    """
    env = env_info()
    if env.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)
    return DistInfo(0, 1, 0)


def mean_across(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity in a single process)."""
    if info.world == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / info.world


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()

