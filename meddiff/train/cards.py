"""Model cards: ``model.json`` of a finished run (or per-class part), written last, and the group
card of a per-class model once every part is complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meddiff import storage
from meddiff.errors import ArtifactError
from meddiff.models.networks import param_count
from meddiff.records import make_record, sha256_bytes, sha256_file, to_jsonable
from meddiff.train.checkpoint import checkpoint_files, list_checkpoints
from meddiff.train.config import RunPlan
from meddiff.train.distributed import DistInfo
from meddiff.train.records import read_metrics, write_loss_curve
from meddiff.train.run_folder import RunFolder
from meddiff.train.sessions import SessionLog


def finish_part(plan: RunPlan, class_id: int | None, identity: dict[str, Any], folder: RunFolder,
                 ema_net: torch.nn.Module, device: torch.device, info: DistInfo, session: SessionLog) -> dict:
    """Rank 0: loss curve, then the card (model.json) last; remote roots get the files, the card last."""
    ckpt = list_checkpoints(folder.local)[-1]
    if int(ckpt.name[5:12]) != plan.cfg.steps:  # e.g. a named run resumed with fewer steps than it has
        raise ArtifactError(f"{folder.local} has no checkpoint for the final step {plan.cfg.steps}")
    write_loss_curve(folder.local, plan.run_id if class_id is None else f"{plan.run_id} class {class_id}")
    card = part_card(plan, class_id, identity, folder, ckpt, ema_net, read_metrics(folder.local), device, info,
                      session)
    storage.write_json(str(folder.local / "model.json"), card)
    samples = [p.relative_to(folder.local).as_posix() for p in sorted((folder.local / "samples").rglob("*.png"))]
    folder.push(["config.json", "metrics.jsonl", "loss_curve.png", *checkpoint_files(ckpt), *samples,
                 "model.json"])
    return card


def part_card(plan: RunPlan, class_id: int | None, identity: dict[str, Any], folder: RunFolder, ckpt: Path,
               ema_net: torch.nn.Module, rows: list[dict], device: torch.device, info: DistInfo,
               session: SessionLog) -> dict[str, Any]:
    ds, cfg = plan.dataset, plan.cfg
    dataset_card_sha = sha256_bytes(storage.read_bytes(storage.join(ds.uri, "dataset.json")))
    return make_record(
        "model" if class_id is None else "model-part", plan.config_record(),
        {"dataset": {"uri": ds.uri, "version": ds.version, "card_sha256": dataset_card_sha}},
        uri=folder.uri, run_id=plan.run_id, mode=cfg.mode, preset=cfg.preset, objective=cfg.objective,
        dataset={"uri": ds.uri, "name": ds.card.get("name"), "version": ds.version},
        class_names=ds.class_names, null_class=ds.num_classes if class_id is None else None, **identity,
        param_count=param_count(ema_net), steps=cfg.steps, final_loss=rows[-1]["loss"] if rows else None,
        wall_time_s=round(session.wall_time(), 2), sessions=session.sessions(cfg.steps), device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        world_size=info.world, checkpoint=f"checkpoints/{ckpt.name}", checkpoint_sha256=sha256_file(ckpt),
        samples=f"samples/step-{cfg.steps:07d}", weights_config=plan.portable_record(),
    )


def group_card(plan: RunPlan, parts: dict[int, dict[str, Any]]) -> dict[str, Any]:
    ds, cfg = plan.dataset, plan.cfg
    first = parts[0]
    return make_record(
        "model", plan.config_record(), first["inputs"], uri=plan.uri, run_id=plan.run_id, mode=cfg.mode,
        preset=cfg.preset, objective=cfg.objective, dataset=first["dataset"], class_names=ds.class_names,
        null_class=None, num_classes=ds.num_classes, channels=ds.channels, image_size=ds.image_size,
        network=to_jsonable(plan.network), scheduler_config=plan.scheduler_config, latent=plan.autoencoder,
        conditioning="embedding", parts={str(c): f"class-{c}" for c in parts},
        checkpoint_sha256={ds.class_names[c]: p["checkpoint_sha256"] for c, p in parts.items()},
        param_count=sum(p["param_count"] for p in parts.values()), steps=cfg.steps,
        wall_time_s=round(sum(p["wall_time_s"] for p in parts.values()), 2),
        sessions={ds.class_names[c]: p.get("sessions") for c, p in parts.items()}, device=first["device"],
        device_name=first["device_name"], world_size=first["world_size"], weights_config=plan.portable_record(),
    )


def finish_group(plan: RunPlan) -> dict[str, Any]:
    """Per-class: write the group model.json once every class part is complete."""
    parts = {}
    for c in plan.parts:
        uri = storage.join(plan.part_uri(c), "model.json")
        if not storage.exists(uri):
            raise ArtifactError(f"{plan.uri}: class {c} has not finished training")
        parts[c] = storage.read_json(uri)
    card = group_card(plan, parts)
    storage.write_json(storage.join(plan.uri, "model.json"), card)
    return card
