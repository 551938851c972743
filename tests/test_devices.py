"""One device resolver (meddiff.devices) and the CUDA-only paths a CPU machine can still check:
rank → GPU binding under torchrun, per-class parts spread over GPUs, RNG restore on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from meddiff import devices
from meddiff.devices import DeviceUnavailableError, part_device, resolve_device
from meddiff.errors import MeddiffError
from meddiff.train import distributed
from meddiff.train.checkpoint import list_checkpoints
from meddiff.train.loop import load_resume_state, process_device, restore_generator, set_rng_state


@pytest.mark.parametrize("requested, count, local_rank, world, expected", [
    ("auto", 0, 0, 1, "cpu"),
    ("auto", 2, 0, 1, "cuda:0"),
    ("cpu", 4, 0, 1, "cpu"),
    ("cuda", 2, 0, 1, "cuda:0"),
    ("cuda:1", 2, 0, 1, "cuda:1"),
    ("cuda", 4, 3, 4, "cuda:3"),  # torchrun: rank r on GPU r
    ("cuda:0", 2, 1, 2, "cuda:1"),  # was: every rank on GPU 0
    ("cuda:2", 4, 1, 2, "cuda:3"),  # an explicit index is the first GPU of the job
    ("auto", 2, 1, 2, "cuda:1"),
])
def test_resolve_device_maps_ranks_to_their_own_gpu(requested, count, local_rank, world, expected):
    assert str(resolve_device(requested, local_rank=local_rank, world=world, device_count=count)) == expected


def test_resolve_device_refuses_what_it_cannot_give():
    with pytest.raises(DeviceUnavailableError, match="only 2 GPU"):
        resolve_device("cuda:1", local_rank=1, world=2, device_count=2)
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU is visible.*allow the CPU fallback \\(--x\\)"):
        resolve_device("cuda", fallback_switch="--x", device_count=0)
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU is visible") as e:
        resolve_device("cuda", device_count=0)
    assert "fallback" not in str(e.value)  # offered only by callers that have the switch
    with pytest.warns(UserWarning, match="running on the CPU"):
        assert resolve_device("cuda:0", allow_cpu_fallback=True, device_count=0).type == "cpu"
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "tpu:0"):
        with pytest.raises(MeddiffError, match="device must be auto, cpu, cuda or cuda:<N>"):
            resolve_device(bad, device_count=1)


def test_parallel_parts_spread_over_the_visible_gpus():
    assert [part_device("cuda", k, device_count=2) for k in range(5)] == ["cuda:0", "cuda:1", "cuda:0",
                                                                         "cuda:1", "cuda:0"]
    assert [part_device("auto", k, device_count=3) for k in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]
    assert part_device("cuda:1", 4, device_count=2) == "cuda:1"  # an explicit GPU stays
    assert part_device("auto", 1, device_count=0) == "auto" and part_device("cpu", 1, device_count=2) == "cpu"


def test_training_process_takes_its_gpu_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    assert process_device("cuda:0") == torch.device("cuda", 1)


def test_ddp_binds_the_rank_to_its_gpu_before_nccl(monkeypatch):
    calls: dict = {}
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    info = distributed.ensure_process_group(torch.device("cuda", 1))
    assert calls["set_device"] == torch.device("cuda", 1)
    assert calls["init"] == {"backend": "nccl", "device_id": torch.device("cuda", 1)}
    assert (info.rank, info.world, info.local_rank) == (1, 2, 1)


def test_resume_restores_rng_from_a_checkpoint_whatever_device_it_was_mapped_to(tiny_conditional_model_uri):
    ckpt = list_checkpoints(Path(tiny_conditional_model_uri))[-1]
    # the defect: training mapped the checkpoint onto its device (a GPU; `meta` stands in for any
    # non-CPU device here), and torch's RNG setters accept CPU ByteTensors only
    mapped = torch.load(ckpt, map_location="meta", weights_only=True)
    with pytest.raises((TypeError, RuntimeError, NotImplementedError)):
        torch.Generator().set_state(mapped["rng"]["generator"])
    state = load_resume_state(ckpt)
    saved = state["rng"]["generator"]  # the part's own training stream (not torch's global one)
    assert saved.device.type == "cpu" and saved.dtype == torch.uint8 and state["rng"]["device"] == "cpu"
    g = torch.Generator()
    assert restore_generator(g, state["rng"])
    first = torch.rand(4, generator=g)
    assert restore_generator(g, state["rng"]) and torch.equal(torch.rand(4, generator=g), first)  # continues exactly
    # a checkpoint from before per-part generators saved torch's global streams, which training drew from
    assert restore_generator(g, {"torch": saved}) and torch.equal(torch.rand(4, generator=g), first)
    assert not restore_generator(g, {"generator": saved, "device": "cuda"})  # another kind of device: fresh
    set_rng_state({"torch": saved})  # autoencoder training still resumes torch's global stream
    assert torch.equal(torch.rand(4), first)
