"""Bad input to training stops with one clear MeddiffError; checkpoints are never left partial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from meddiff.models import load_model
from meddiff.train.checkpoint import list_checkpoints
from meddiff.errors import ArtifactError, MeddiffError
from meddiff.train import TrainConfig, train


def copy_dataset(uri: str, dest: Path, **card_changes) -> str:
    shutil.copytree(uri, dest)
    card = json.loads((dest / "dataset.json").read_text())
    card.update(card_changes)
    (dest / "dataset.json").write_text(json.dumps(card))
    return str(dest)


def tiny(uri: str, **kw) -> TrainConfig:
    return TrainConfig(uri, **{"steps": 4, "batch_size": 8, "device": "cpu", "checkpoint_every": 2, "preview_steps": 2,
                               **kw})


def test_missing_dataset(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        train(tiny(str(tmp_path / "datasets/none/abc")), str(tmp_path))


def test_incomplete_dataset(breastmnist_uri, tmp_path):
    no_card = tmp_path / "ds1"
    shutil.copytree(breastmnist_uri, no_card)
    (no_card / "dataset.json").unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        train(tiny(str(no_card)), str(tmp_path))
    no_shard = Path(copy_dataset(breastmnist_uri, tmp_path / "ds2"))
    next(no_shard.glob("train-*.tar")).unlink()
    with pytest.raises(ArtifactError, match="shard .* is missing"):
        train(tiny(str(no_shard)), str(tmp_path))


@pytest.mark.parametrize("change,message", [({"image_size": 32}, "takes image sizes"),
                                            ({"channels": 4}, "4 channels")])
def test_image_the_preset_cannot_take(breastmnist_uri, tmp_path, change, message):
    with pytest.raises(MeddiffError, match=message):
        train(tiny(copy_dataset(breastmnist_uri, tmp_path / "ds", **change)), str(tmp_path))


@pytest.mark.parametrize("field,value", [("mode", "joint"), ("objective", "edm"), ("prediction", "x0"),
                                         ("schedule", "quadratic"), ("preset", "huge"), ("steps", 0),
                                         ("label_dropout", 1.0), ("device", "tpu")])
def test_invalid_config_fails_up_front(breastmnist_uri, tmp_path, field, value):
    with pytest.raises(MeddiffError, match=field if field != "preset" else "unknown preset"):
        train(tiny(breastmnist_uri, **{field: value}), str(tmp_path))
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_a_run_name_cannot_leave_its_folder(breastmnist_uri, tmp_path, name):
    """--run-name ../escape trained into <root>/escape, beside models/ (the cohort and dataset names
    were checked; the run name was not). Diffusion models and autoencoders alike."""
    from meddiff.train.ae_config import AETrainConfig

    root = tmp_path / "root"
    with pytest.raises(MeddiffError, match=f"--run-name {name!r} is not a usable name"):
        train(tiny(breastmnist_uri, run_name=name), str(root))
    with pytest.raises(MeddiffError, match="autoencoders/<name>/"):
        AETrainConfig(breastmnist_uri, run_name=name).check()
    assert not root.exists() and not (tmp_path / "escape").exists()


def test_min_snr_only_for_ddpm(breastmnist_uri, tmp_path):
    with pytest.raises(MeddiffError, match="min_snr_gamma"):
        train(tiny(breastmnist_uri, objective="rflow", min_snr_gamma=5.0), str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_requested_but_absent(breastmnist_uri, tmp_path):
    with pytest.raises(MeddiffError, match="CUDA was requested"):
        train(tiny(breastmnist_uri, device="cuda"), str(tmp_path))


def test_class_count_differs_from_the_checkpoint_resumed(breastmnist_uri, bloodmnist_uri, tmp_path):
    first = train(tiny(breastmnist_uri, run_name="shared"), str(tmp_path))
    (Path(first.uri) / "model.json").unlink()  # as if it had been killed after its last checkpoint
    with pytest.raises(MeddiffError, match="trained on 2 classes but the dataset has 8"):
        train(tiny(bloodmnist_uri, run_name="shared"), str(tmp_path))


def test_a_named_run_answers_only_the_request_it_was_trained_for(breastmnist_uri, tmp_path):
    """--run-name stands in for the content-addressed run id: a finished named run was returned for any
    request with its name ('model already trained; nothing to do' for twice the steps or another learning
    rate), and an unfinished one resumed under changed settings (and rewrote its config.json first)."""
    root = str(tmp_path)
    first = train(tiny(breastmnist_uri, run_name="named"), root)
    run = Path(first.uri)
    assert train(tiny(breastmnist_uri, run_name="named"), root).existed  # its own request finds it
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    for change, message in (({"steps": 6}, "named is finished at 4 steps and this request asks for 6"),
                            ({"lr": 1e-3}, r"named was trained with other settings \(lr: 0.002 → 0.001\)")):
        with pytest.raises(MeddiffError, match=message):
            train(tiny(breastmnist_uri, run_name="named", **change), root)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files
    (run / "model.json").unlink()  # as if killed after its last checkpoint
    config = (run / "config.json").read_bytes()
    with pytest.raises(MeddiffError, match=r"checkpoints trained with other settings \(lr: 0.002 → 0.001\)"):
        train(tiny(breastmnist_uri, run_name="named", lr=1e-3), root)
    with pytest.raises(MeddiffError, match="at step 4 already .* past the 2 steps asked for"):
        train(tiny(breastmnist_uri, run_name="named", steps=2), root)
    assert (run / "config.json").read_bytes() == config
    longer = train(tiny(breastmnist_uri, run_name="named", steps=6), root)  # until it finishes, steps may change
    assert longer.card["steps"] == 6 and [s["steps"] for s in longer.card["sessions"]] == [[0, 4], [4, 6]]


def test_corrupt_checkpoint(breastmnist_uri, tmp_path):
    result = train(tiny(breastmnist_uri), str(tmp_path))
    run = Path(result.uri)
    latest = list_checkpoints(run)[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated on disk
    with pytest.raises(ArtifactError, match="sha256 .* does not match"):
        load_model(result.uri)
    (run / "model.json").unlink()
    with pytest.raises(ArtifactError, match="corrupt or unreadable"):
        train(tiny(breastmnist_uri), str(tmp_path))
    train(tiny(breastmnist_uri, resume=False), str(tmp_path))  # --no-resume starts over and finishes
    assert load_model(result.uri).card["steps"] == 4


def test_nan_loss_stops_without_writing_a_checkpoint(breastmnist_uri, tmp_path):
    cfg = tiny(breastmnist_uri, steps=20, log_every=1, checkpoint_every=20, lr=1e30, warmup_steps=0, grad_clip=1e30)
    with pytest.raises(MeddiffError, match="loss became nan|loss became inf"):
        train(cfg, str(tmp_path))
    assert not list((tmp_path / "models").rglob("*.pt")) and not list((tmp_path / "models").rglob("model.json"))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    import sys

    from meddiff.cli import main

    monkeypatch.setattr(sys, "argv", ["meddiff", "train", str(tmp_path / "nope"), "--storage", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "Traceback" not in err
