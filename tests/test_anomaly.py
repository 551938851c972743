"""Anomaly detection on real BreastMNIST: a tiny per-class model, the normal class "normal, benign";
malignant images must score above chance (image-level AUROC), with the outputs on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meddiff import storage
from meddiff.analysis.reconstruct import auroc, auroc_ci
from meddiff.errors import MeddiffError


def test_auroc_matches_its_definition():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.5])
    positive = np.array([False, False, True, True, True])
    # pairs (anomaly > normal): 0.35>0.1, 0.8>both, 0.5>both → 5 of 6
    assert auroc(scores, positive) == pytest.approx(5 / 6)
    assert auroc(-scores, positive) == pytest.approx(1 / 6)
    lo, hi = auroc_ci(np.r_[scores, scores], np.r_[positive, positive], n_boot=200)
    assert lo <= 5 / 6 <= hi


@pytest.fixture(scope="module")
def breast_normal_model(breastmnist_uri: str, session_storage: str) -> str:
    """Tiny unconditional DDPM models per BreastMNIST class (the "normal, benign" one is used)."""
    from meddiff.train import TrainConfig, train

    cfg = TrainConfig(breastmnist_uri, mode="per-class", preset="tiny", steps=60, batch_size=16, device="cpu",
                      preview_steps=2, seed=0)
    return train(cfg, session_storage).uri


@pytest.fixture(scope="module")
def breast_anomaly(breast_normal_model: str, breastmnist_uri: str, session_storage: str) -> dict:
    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies

    cfg = AnomalyConfig(normal="normal, benign", split="test", level=0.25, steps=5, max_images=None, heatmaps=6,
                        device="cpu")
    return detect_anomalies(breast_normal_model, breastmnist_uri, cfg, session_storage)


@pytest.mark.slow
def test_score_histograms_survive_a_near_constant_float32_score():
    """A barely trained conditional model ignores its label: its ratio score is 1 ± 1e-7 in float32, and
    the distributions plot once failed the whole run ("Cannot create 30 finite-sized bins")."""
    from meddiff.analysis.anomaly import distributions_png

    rng = np.random.default_rng(0)
    n = 40
    table = pd.DataFrame({"class_name": ["normal"] * 20 + ["malignant"] * 20,
                          "pixel_score": rng.random(n).astype(np.float32),
                          "feature_score": rng.random(n).astype(np.float32),
                          "ratio_score": (1 + rng.normal(0, 3e-7, n)).astype(np.float32)})
    table.loc[0, "feature_score"] = np.nan
    assert distributions_png(table, ["malignant", "normal"], "normal").startswith(b"\x89PNG")


def test_the_flow_scores_the_models_own_dataset_when_none_is_given(prefect_harness, breast_normal_model,
                                                                  breastmnist_uri, session_storage):
    """`meddiff anomaly` takes the dataset as optional (the model's own); the detect-anomalies flow
    still required it, so a deployment run without dataset_uri was rejected."""
    from flows.detect_anomalies import detect_anomalies as flow

    uri = flow(model_uri=breast_normal_model, normal="normal, benign", level=0.25, steps=2, max_images=12,
               device="cpu", storage_root=session_storage)
    rec = json.loads((Path(uri) / "anomaly.json").read_text())
    assert rec["inputs"]["dataset"] == breastmnist_uri and sum(rec["counts"].values()) == 12


def test_breastmnist_anomaly_scores_are_written_and_reused(breast_anomaly, breast_normal_model, breastmnist_uri,
                                                           session_storage):
    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies

    rec = breast_anomaly
    pixel = rec["auroc"]["pixel"]["all anomalies"]
    assert pixel["n_anomalous"] == 42 and pixel["n_normal"] == 114  # the official test split
    assert 0 <= pixel["ci"][0] <= pixel["auroc"] <= pixel["ci"][1] <= 1
    table = pd.read_parquet(storage.join(rec["uri"], "scores.parquet"))
    assert len(table) == 156 and table["anomalous"].sum() == 42 and table["pixel_score"].gt(0).all()
    assert auroc(table["pixel_score"].to_numpy(), table["anomalous"].to_numpy()) == pytest.approx(pixel["auroc"])
    for name in ("heatmaps.png", "distributions.png"):
        assert storage.read_bytes(storage.join(rec["uri"], name))[:4] == b"\x89PNG"
    cfg = AnomalyConfig(**{**rec["config"], "device": "cpu"})
    from told import Told

    told = Told()
    again = detect_anomalies(breast_normal_model, breastmnist_uri, cfg, session_storage, told)  # reused
    assert again["created_at"] == rec["created_at"]
    assert told == [f"reusing {rec['uri']}: the same request was scored before"] and told.counts == []


def test_a_second_request_waits_for_the_process_scoring_it_then_reuses_its_folder(
        breast_anomaly, breast_normal_model, breastmnist_uri, session_storage, tmp_path):
    """anomaly took no lock: two identical requests at once both reconstructed every image."""
    import shutil

    from held_lock import waits_then_reuses
    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies

    rec = breast_anomaly
    cfg = AnomalyConfig(**{**rec["config"], "device": "cpu"})
    record, aside = Path(rec["uri"]) / "anomaly.json", tmp_path / "anomaly.json"
    shutil.move(record, aside)  # as if the first request were still scoring
    told, again = waits_then_reuses(
        lambda told: detect_anomalies(breast_normal_model, breastmnist_uri, cfg, session_storage, told),
        rec["uri"], lambda: shutil.move(aside, record))
    assert again["created_at"] == rec["created_at"] and told.counts == []  # no image reconstructed twice
    assert told[-1] == f"reusing {rec['uri']}: the same request was scored before"


def test_a_first_run_says_it_trains_the_domain_classifier_and_keeps_its_steps_off_the_bar(
        breast_normal_model, breastmnist_uri, tmp_path):
    """The first anomaly run on a dataset trained the domain classifier (minutes on a CPU) in silence,
    its bar already full."""
    from functools import partial

    from told import Told

    from meddiff.analysis.anomaly import AnomalyConfig, _score_split
    from meddiff.analysis.reconstruct import reconstruct
    from meddiff.data.shards import open_dataset
    from meddiff.evaluate.features import DomainTrainConfig, load_or_train_domain
    from meddiff.models.trained import load_model

    ds, model = open_dataset(breastmnist_uri), load_model(breast_normal_model, "cpu")
    cfg = AnomalyConfig(normal="normal, benign", split="test", level=0.25, steps=2, max_images=12, device="cpu")
    told = Told()
    _score_split(ds, model, ds.class_names.index("normal, benign"), cfg, reconstruct,
                 partial(load_or_train_domain, cache_root=str(tmp_path)), DomainTrainConfig(steps=3, batch_size=16),
                 told)
    assert [line.split(" (")[0] for line in told] == [f"training the domain classifier of breastmnist {ds.version}"]
    assert told.counts and {total for _, total in told.counts} == {12}  # reconstructions only, not its 3 steps


def test_the_cli_says_which_scores_are_label_free(breast_anomaly, breast_normal_model, breastmnist_uri,
                                                  session_storage):
    """The feature score (often the best AUROC in the table) uses a classifier trained on the anomaly
    labels; the record said so, the command's table did not."""
    from typer.testing import CliRunner

    from meddiff.cli import app

    out = CliRunner().invoke(app, ["anomaly", breast_normal_model, breastmnist_uri, "--normal", "normal, benign",
                                   "--level", "0.25", "--steps", "5", "--max-images", "0", "--heatmaps", "6",
                                   "--device", "cpu", "--storage", session_storage], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert out.output.strip().splitlines()[-1] == breast_anomaly["uri"]  # the fixture's record, reused
    assert "so it is not label-free" in out.output and "feature" in out.output
    implied = CliRunner().invoke(app, ["anomaly", breast_normal_model, "--normal", "normal, benign", "--level", "0.25",
                                       "--steps", "5", "--max-images", "0", "--heatmaps", "6", "--device", "cpu",
                                       "--storage", session_storage], terminal_width=200)
    assert implied.exit_code == 0, implied.output  # the dataset: the one the model learned from
    assert implied.output.strip().splitlines()[-1] == breast_anomaly["uri"]


@pytest.fixture(scope="module")
def breast_conditional_model(breastmnist_uri: str, session_storage: str) -> str:
    """A tiny class-conditional DDPM on all BreastMNIST training images (10 % label dropout: a null label)."""
    from meddiff.train import TrainConfig, train

    cfg = TrainConfig(breastmnist_uri, mode="conditional", preset="tiny", steps=1500, batch_size=32, device="cpu",
                      preview_steps=2, seed=0)
    return train(cfg, session_storage).uri


@pytest.mark.slow
def test_breastmnist_malignant_scores_above_chance(breast_conditional_model, breastmnist_uri, session_storage):
    """The ratio score (error toward "normal, benign" / error of the unconditional reconstruction from the same
    noise), its noise level chosen on the val split, ranks malignant test images above normal/benign ones.
    (The plain pixel error does not: malignant masses are darker and smoother, so they are reconstructed
    closer by any model; measured 0.38–0.42 on the test split.)"""
    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies

    from told import Told

    told = Told()  # the progress of the last run: two reconstructions per image (the ratio score's second)

    def run(split: str, level: float) -> dict:
        cfg = AnomalyConfig(normal="normal, benign", split=split, level=level, steps=10, max_images=None,
                            heatmaps=4, device="cpu")
        told.counts.clear()
        return detect_anomalies(breast_conditional_model, breastmnist_uri, cfg, session_storage, told)["auroc"]

    val = {level: run("val", level)["ratio"]["all anomalies"]["auroc"] for level in (0.1, 0.5)}
    test = run("test", max(val, key=val.get))  # model selection on val, the verdict on test
    assert told.counts[-1] == (2 * 156, 2 * 156) and told.counts == sorted(told.counts) and len(told.counts) > 2
    ratio, pixel = test["ratio"]["all anomalies"], test["pixel"]["all anomalies"]
    assert ratio["n_anomalous"] == 42 and ratio["n_normal"] == 114
    assert ratio["auroc"] > 0.55 and ratio["auroc"] > pixel["auroc"] + 0.1, (val, test)


def test_unknown_normal_class_is_a_clear_error(tiny_per_class_model_uri, breastmnist_uri, session_storage):
    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies

    with pytest.raises(MeddiffError, match="unknown normal class 'healthy'"):
        detect_anomalies(tiny_per_class_model_uri, breastmnist_uri, AnomalyConfig(normal="healthy", device="cpu"),
                         session_storage)


def test_guidance_a_model_cannot_take_is_refused(tiny_per_class_model_uri, breastmnist_uri, session_storage):
    """--guidance 2 on a per-class model was ignored, yet recorded in anomaly.json's config (and a negative
    scale accepted): a record of settings that did not act."""
    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies

    with pytest.raises(MeddiffError, match="--guidance 2.0 guides a conditional model .* it is per-class"):
        detect_anomalies(tiny_per_class_model_uri, breastmnist_uri,
                         AnomalyConfig(normal="malignant", guidance=2.0, device="cpu"), session_storage)
    with pytest.raises(MeddiffError, match="--guidance must be ≥ 0"):
        AnomalyConfig(normal="malignant", guidance=-1.0).check()
