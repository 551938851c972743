"""Training checkpoints: written atomically, rotated; resumed from (see ``load_checkpoint``).

A run folder ``<root>/models/<run-id>/`` (or its ``class-<i>/`` parts) holds
``checkpoints/step-XXXXXXX.pt``. Each checkpoint is written to a temp file in the same folder,
fsynced and renamed, so a killed writer never leaves a partial file under a checkpoint name.

A checkpoint holds only what training computed (weights, optimiser, RNG, step, the config without
paths), so the same training writes the same bytes whatever its storage root and however long it took
(on a CPU, with the same thread count: kernels' last bits follow it): its sha256 names the weights in
model and cohort identities. What differs run to run, the wall time spent and the sessions (device,
CPU threads) that reached it, sits beside it in ``step-XXXXXXX.json``, its session record
(``meddiff.train.sessions``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from meddiff import storage
from meddiff.errors import MeddiffError
from meddiff.records import to_jsonable
from meddiff.models.trained import CHECKPOINT_FORMAT, load_checkpoint  # noqa: F401  (the reader lives with the loader)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a local run folder, oldest first (temp files are ignored)."""
    d = run_dir / CHECKPOINT_DIR
    return sorted(d.glob("step-*.pt")) if d.is_dir() else []


def session_record(checkpoint: Path) -> Path:
    """``step-XXXXXXX.json`` beside ``step-XXXXXXX.pt``: the run-to-run facts of that checkpoint."""
    return checkpoint.with_suffix(".json")


def checkpoint_files(checkpoint: Path) -> list[str]:
    """A checkpoint and its session record, relative to the run folder (what a remote run uploads)."""
    return [f"{CHECKPOINT_DIR}/{checkpoint.name}", f"{CHECKPOINT_DIR}/{session_record(checkpoint).name}"]


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int, record: dict[str, Any]) -> Path:
    """Write ``state`` atomically as ``checkpoints/step-<step>.pt``, then its session ``record`` (the wall
    time and the sessions up to here: ``SessionLog.record``); keep the ``keep`` newest pairs."""
    d = run_dir / CHECKPOINT_DIR
    d.mkdir(parents=True, exist_ok=True)
    dest = d / checkpoint_name(step)
    with storage.atomic_file(dest) as f:
        torch.save({"format": CHECKPOINT_FORMAT, "step": step, **state}, f)
    storage.write_json(str(session_record(dest)), record)
    for old in list_checkpoints(run_dir)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
        session_record(old).unlink(missing_ok=True)
    for stale in d.glob(".step-*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    return dest


def portable_config(config_record: dict[str, Any], dataset_version: str, operational: tuple[str, ...] = ()
                    ) -> dict[str, Any]:
    """A run's config as a checkpoint keeps it: the dataset by version, not by path, so the same run
    reached through another storage root (a clone, a moved root, a worker's mount) has the same bytes;
    without the ``operational`` settings (the config's OPERATIONAL: device, thread count, intervals...),
    which do not change the weights, so the same training asked for with ``--threads 2`` or left to pick
    2 threads writes the same bytes too (the threads used are in the session record)."""
    drop = {"dataset_uri", *operational}
    return {**{k: v for k, v in config_record.items() if k not in drop}, "dataset_version": dataset_version}


def setting_differences(recorded: dict[str, Any], requested: dict[str, Any], ignore: tuple[str, ...] = ()
                        ) -> dict[str, str]:
    """``{name: "recorded → requested"}`` for each setting that two portable configs both hold and differ in."""
    def short(v: Any) -> str:
        text = json.dumps(to_jsonable(v), sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    return {k: f"{short(recorded[k])} → {short(requested[k])}" for k in sorted(recorded.keys() & requested.keys())
            if k not in ignore and to_jsonable(recorded[k]) != to_jsonable(requested[k])}


def check_named_run(run_id: str, recorded: dict[str, Any] | None, requested: dict[str, Any], finished: bool,
                    ignore: tuple[str, ...] = ()) -> None:
    """A run named by ``--run-name`` is not content-addressed: only this check keeps a request from being
    answered with weights trained otherwise. A finished run must hold the settings asked for, steps
    included; an unfinished one (resumed from ``recorded``, its checkpoint's config) may change its steps
    only. ``recorded`` None (a card from before cards kept it): nothing to check against."""
    if recorded is None:
        return
    diffs = setting_differences(recorded, requested, ignore + (() if finished else ("steps",)))
    if not diffs:
        return
    listed = "; ".join(f"{k}: {v}" for k, v in diffs.items())
    if finished and list(diffs) == ["steps"]:
        raise MeddiffError(f"{run_id} is finished at {recorded['steps']} steps and this request asks for "
                           f"{requested['steps']}: a finished run is never changed (its cohorts name its weights); "
                           "train it under another --run-name, or leave --run-name out")
    if finished:
        raise MeddiffError(f"{run_id} was trained with other settings ({listed}): a named run answers only "
                           "the request it was trained for; use another --run-name, or leave --run-name out (the run "
                           "id then follows the settings)")
    raise MeddiffError(f"{run_id} has checkpoints trained with other settings ({listed}): only --steps may "
                       "change before a named run finishes; use another --run-name, leave --run-name out (the run id "
                       "then follows the settings), or --no-resume to start this one over")


def finished_card(card_uri: str, plan: Any) -> dict[str, Any]:
    """The card of a finished model, part or autoencoder (``plan``: its RunPlan or AERunPlan); a named
    run's must hold the settings asked for (:func:`check_named_run`)."""
    card = storage.read_json(card_uri)
    if plan.cfg.run_name:
        check_named_run(plan.run_id, card.get("weights_config"), plan.portable_record(), finished=True)
    return card


def check_steps_ahead(run_id: str, step: int, steps: int, checkpoint: Path) -> None:
    """A checkpoint past the steps asked for (a named run asked for fewer steps) cannot be resumed."""
    if step > steps:
        raise MeddiffError(f"{run_id} is at step {step} already ({checkpoint}), past the {steps} steps asked for: "
                           f"ask for {step} or more, or --no-resume to start over")
