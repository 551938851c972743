"""Latent diffusion on real BreastMNIST (1 channel, 28 px, 2 classes) with CPU-sized settings:
autoencoder training + resume, encode (latent shards + reconstruction report), latent conditional
(cross-attention) and per-class denoisers, generation + verify + regenerate, and bad inputs."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.errors import ArtifactError, MeddiffError

AE_KW = dict(steps=6, batch_size=8, adv_warmup_steps=3, checkpoint_every=3, log_every=3, device="cpu")


@pytest.fixture(scope="module")
def vae_uri(breastmnist_uri: str, session_storage: str) -> str:
    from meddiff.train.ae_config import AETrainConfig
    from meddiff.train.autoencoder import train_autoencoder

    return train_autoencoder(AETrainConfig(breastmnist_uri, kind="vae", **AE_KW), session_storage).uri


@pytest.fixture(scope="module")
def vqvae_uri(breastmnist_uri: str, session_storage: str) -> str:
    from meddiff.train.ae_config import AETrainConfig
    from meddiff.train.autoencoder import train_autoencoder

    return train_autoencoder(AETrainConfig(breastmnist_uri, kind="vqvae", **AE_KW), session_storage).uri


@pytest.fixture(scope="module")
def latent_conditional_uri(breastmnist_uri: str, vae_uri: str, session_storage: str) -> str:
    from meddiff.train import TrainConfig, train

    cfg = TrainConfig(breastmnist_uri, steps=4, batch_size=8, device="cpu", preview_steps=2, objective="rflow",
                      latent=vae_uri, conditioning="cross-attention")
    return train(cfg, session_storage).uri


def _rows(uri: str) -> list[dict]:
    return [json.loads(line) for line in (Path(uri) / "metrics.jsonl").read_text().splitlines()]


def test_autoencoder_card_scale_factor_and_records(vae_uri, breastmnist_uri):
    from meddiff.data.shards import open_dataset
    from meddiff.models.autoencoders import load_autoencoder

    ae = load_autoencoder(vae_uri)
    card = ae.card
    assert card["latent_shape"] == [4, 7, 7] and card["factor"] == 4
    assert card["compression_ratio"] == pytest.approx(28 * 28 / (2 * 4 * 7 * 7))  # uint8 pixels vs fp16 latents
    # the recorded scale factor whitens latents of images it was not estimated on (val split)
    x, _ = open_dataset(breastmnist_uri).load_split("val")
    z = ae.to_latent(torch.from_numpy(x[:64]).float().div(127.5).sub(1))
    assert 0.6 < float(z.std()) < 1.6, float(z.std())
    rows = _rows(vae_uri)
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["l1"] > 0 and r["val_l1"] > 0 and "kl" in r for r in rows)
    assert "disc" not in rows[0] and rows[1]["disc"] > 0  # discriminator on after the warm-up (step 3)
    for rel in ("loss_curve.png", "samples/step-0000006/reconstructions.png", "weights.pt", "config.json"):
        assert (Path(vae_uri) / rel).is_file(), rel


def test_autoencoder_resumes_from_its_checkpoint(breastmnist_uri, tmp_path, monkeypatch):
    from meddiff.train import autoencoder as ae_train
    from meddiff.train.ae_config import AETrainConfig

    cfg = AETrainConfig(breastmnist_uri, kind="vqvae", **AE_KW)
    first = ae_train.train_autoencoder(cfg, str(tmp_path))
    run = Path(first.uri)
    (run / "model.json").unlink()  # as if killed after the step-3 checkpoint
    (run / "checkpoints" / "step-0000006.pt").unlink()
    steps_done = []
    real_step = ae_train.ae_step
    monkeypatch.setattr(ae_train, "ae_step", lambda st, x, step: steps_done.append(step) or real_step(st, x, step))
    second = ae_train.train_autoencoder(cfg, str(tmp_path))
    assert steps_done == [3, 4, 5]  # continued after step 3, not from scratch
    assert [r["step"] for r in _rows(second.uri)] == [3, 6]
    assert second.card["steps"] == 6 and not second.existed
    again = ae_train.train_autoencoder(cfg, str(tmp_path))
    assert again.existed and again.card == second.card


def test_a_named_autoencoder_answers_only_the_request_it_was_trained_for(breastmnist_uri, tmp_path):
    """A finished autoencoder named with --run-name was returned for any request with its name."""
    from meddiff.train.ae_config import AETrainConfig
    from meddiff.train.autoencoder import train_autoencoder

    kw = {**AE_KW, "steps": 3, "run_name": "named-ae"}
    first = train_autoencoder(AETrainConfig(breastmnist_uri, kind="vae", **kw), str(tmp_path))
    assert train_autoencoder(AETrainConfig(breastmnist_uri, kind="vae", **kw), str(tmp_path)).existed
    with pytest.raises(MeddiffError, match="named-ae is finished at 3 steps and this request asks for 6"):
        train_autoencoder(AETrainConfig(breastmnist_uri, kind="vae", **{**kw, "steps": 6}), str(tmp_path))
    with pytest.raises(MeddiffError, match=r"named-ae was trained with other settings \(kl_weight: "):
        train_autoencoder(AETrainConfig(breastmnist_uri, kind="vae", kl_weight=0.5, **kw), str(tmp_path))
    assert first.card["weights_config"]["steps"] == 3
    # interrupted before its card (checkpoint at step 3): resumed, it may change only its steps; the
    # perceptual-loss weights were not compared, so a loss it never trained with joined half-way
    import torchvision

    torch.manual_seed(0)
    feats = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in feats.items()}, tmp_path / "alexnet.pt")
    (Path(first.uri) / "model.json").unlink()
    with pytest.raises(MeddiffError, match=r"named-ae has checkpoints trained with other settings \(perceptual_weights: "):
        train_autoencoder(AETrainConfig(breastmnist_uri, kind="vae", perceptual_weights=str(tmp_path / "alexnet.pt"),
                                        **{**kw, "steps": 4}), str(tmp_path))
    assert train_autoencoder(AETrainConfig(breastmnist_uri, kind="vae", **{**kw, "steps": 4}),
                             str(tmp_path)).card["steps"] == 4


def test_encode_writes_codes_shards_and_report(breastmnist_uri, vqvae_uri, session_storage):
    from meddiff.data.shards import iter_shard, open_dataset
    from meddiff.evaluate.reconstruction import encode_with_report

    from told import Told

    told = Told()
    out = encode_with_report(breastmnist_uri, vqvae_uri, "cpu", max_images=40, root=session_storage,
                             domain_steps=5, with_umap=False, progress=told)
    card, ds = out["card"], open_dataset(breastmnist_uri)
    assert not out["existed"] and told == ["reconstruction report on up to 40 val images",
                                           "encoding every split into latent shards"]
    assert told.counts[-1] == (780, 780) and told.counts == sorted(told.counts)  # every split's images, in order
    assert card["counts"] == {s: sum(ds.card["counts"][s].values()) for s in card["counts"]}
    sample = next(iter_shard(str(Path(out["uri"]) / card["shards"]["train"][0])))
    codes = np.load(io.BytesIO(sample["npy"]))
    assert codes.dtype == np.uint16 and codes.shape == (7, 7) and codes.max() < 128
    assert card["bytes_saved"] == card["pixel_bytes_total"] - card["latent_bytes_total"] > 0
    rec = card["reconstruction"]
    assert rec["n"] == 40 and 5 < rec["psnr_db"]["mean"] < 60 and -1 <= rec["ssim"]["mean"] <= 1
    assert rec["ms_ssim"] is None  # 28 px < 161 px
    f = rec["features"]
    assert f["fid"] >= 0 and "baseline" in f
    # KID with an interval, not the mean ± std over 50 subsets of all 40 images (the same set each time:
    # std ~1e-7, an uncertainty of nothing); the baseline (val vs 40 train images) likewise
    for d in (f, f["baseline"]):
        lo, hi = d["kid_ci95"]
        assert lo <= d["kid"] <= hi and hi - lo > 1e-3 * max(abs(d["kid"]), 1e-3), d
    from meddiff.evaluate.reconstruction import summary_lines

    lines = summary_lines(rec)
    assert lines[0].startswith(f"reconstruction of 40 val images: PSNR {rec['psnr_db']['mean']:.2f} dB [")
    assert lines[1].startswith(f"domain features, x̂ vs x: FID {f['fid']:.4g} [") and lines[1].endswith("(n = 40)")
    assert lines[2] == f"warning: {f['warning']}"
    older = {k: v for k, v in f.items() if k != "kid_ci95"}  # latents encoded before KID had an interval
    assert f"KID {f['kid']:.4g};" in summary_lines({**rec, "features": older})[1]
    told = Told()
    assert encode_with_report(breastmnist_uri, vqvae_uri, "cpu", root=session_storage, progress=told)["existed"]
    # asked with other report settings, it says which report the reused latents carry (it said nothing)
    assert told == [f"reusing {out['uri']}: this dataset was encoded with this autoencoder before; its reconstruction "
                    "report is the one made then (40 val images, LPIPS no): delete the folder to encode and report "
                    "again"]
    # refused before any reuse: a count that is no sample (-3 reported on all but 3 images; 0 was a
    # torch.cat traceback and now means all, as evaluate's and anomaly's do), a missing weights file
    for bad, match in (({"max_images": -3}, "must be 0 .all. or at least 2"), ({"max_images": 1}, "at least 2"),
                       ({"perceptual_weights": "/no/such/vgg16.pth"}, "does not exist")):
        with pytest.raises(MeddiffError, match=match):
            encode_with_report(breastmnist_uri, vqvae_uri, "cpu", root=session_storage, **bad)
    from meddiff.evaluate.reconstruction import reconstruction_report

    every, _ = reconstruction_report(breastmnist_uri, vqvae_uri, "cpu", max_images=0, domain_steps=5, with_umap=False)
    assert every["n"] == 78  # all of BreastMNIST's val split


def test_latent_conditional_generate_verify_regenerate(latent_conditional_uri, vae_uri, session_storage):
    from PIL import Image

    from meddiff.data.cohorts import open_cohort, verify
    from meddiff.generate import CohortSpec, generate, regenerate
    from meddiff.models.autoencoders import load_autoencoder

    ae_sha = load_autoencoder(vae_uri).sha256
    res = generate(CohortSpec(latent_conditional_uri, per_class=2, steps=2, device="cpu"), session_storage)
    assert verify(res.uri).ok
    assert res.card["autoencoder"]["uri"] == vae_uri
    assert res.card["inputs"]["checkpoint_sha256"]["autoencoder"] == ae_sha
    manifest = open_cohort(res.uri).manifest()
    row = manifest.iloc[3]
    png = regenerate(res.uri, int(row["sample_id"]), "cpu")
    assert hashlib.sha256(png).hexdigest() == row["image_sha256"]
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (28, 28)  # decoded to the dataset's images
    gif = Image.open(Path(res.uri) / "reverse_diffusion.gif")
    assert gif.size[0] > gif.size[1]  # latent | decoded side by side
    from typer.testing import CliRunner

    from meddiff.cli import app

    shown = CliRunner().invoke(app, ["cohorts", "show", res.uri], terminal_width=300)
    assert shown.exit_code == 0, shown.output
    assert f"autoencoder: {vae_uri} (sha256 {ae_sha[:16]}…)" in shown.output  # what the images were decoded through


def test_latent_per_class_trains_from_latent_shards(breastmnist_uri, vqvae_uri, session_storage, monkeypatch):
    from meddiff.evaluate.reconstruction import encode_with_report
    from meddiff.generate import CohortSpec, generate
    from meddiff.train import TrainConfig, latent, train

    encode_with_report(breastmnist_uri, vqvae_uri, "cpu", max_images=40, root=session_storage, domain_steps=5,
                       with_umap=False)
    monkeypatch.setattr(latent, "latent_batches", lambda *a: pytest.fail("encoded on the fly despite shards"))
    res = train(TrainConfig(breastmnist_uri, mode="per-class", steps=3, batch_size=8, device="cpu", preview_steps=2,
                            latent=vqvae_uri), session_storage)
    assert res.card["latent"]["kind"] == "vqvae" and set(res.card["parts"]) == {"0", "1"}
    cohort = generate(CohortSpec(res.uri, per_class=1, steps=2, device="cpu"), session_storage)
    assert cohort.counts == {"malignant": 1, "normal, benign": 1}


def test_a_fanned_out_latent_part_trains_its_parents_run(prefect_harness, breastmnist_uri, vqvae_uri,
                                                        session_storage):
    """Under a server, train-model hands each class of a per-class run to a train-part flow run. Its
    parameters once left out the autoencoder: every part of a latent run trained a pixel model under
    another run id, and the parent re-submitted each part until it failed. A part now gets every
    parameter the flow takes, and refuses to plan a run other than its parent's."""
    from flows.train_part import part_parameters, train_part
    from meddiff import storage
    from meddiff.train import TrainConfig, plan_run

    cfg = TrainConfig(breastmnist_uri, mode="per-class", steps=2, batch_size=8, device="cpu", latent=vqvae_uri)
    plan = plan_run(cfg, session_storage)
    params = part_parameters(cfg, session_storage, plan.run_id)
    assert train_part(**params, class_id=1) == plan.part_uri(1)
    assert storage.read_json(storage.join(plan.part_uri(1), "model.json"))["latent"]["kind"] == "vqvae"
    with pytest.raises(MeddiffError, match=f"asked for a part of other-run but its parameters plan {plan.run_id}"):
        train_part(**{**params, "run_id": "other-run"}, class_id=1)


def test_autoencoder_of_another_dataset_is_refused(bloodmnist_uri, vae_uri, tmp_path):
    from meddiff.evaluate.reconstruction import encode_with_report
    from meddiff.train import TrainConfig, train

    with pytest.raises(MeddiffError, match="trained on dataset 'breastmnist'"):
        train(TrainConfig(bloodmnist_uri, steps=2, device="cpu", latent=vae_uri), str(tmp_path))
    with pytest.raises(MeddiffError, match="trained on dataset 'breastmnist'"):
        encode_with_report(bloodmnist_uri, vae_uri, "cpu", root=str(tmp_path))
    assert not (tmp_path / "models").exists()
    assert not (Path(bloodmnist_uri) / "latents").exists()


@pytest.mark.parametrize("change,message", [({"image_size": 64}, "takes 1-channel 64 px images"),
                                            ({"channels": 3}, "takes 3-channel 28 px images")])
def test_autoencoder_of_another_size_or_channel_count_is_refused(breastmnist_uri, vae_uri, tmp_path, change, message):
    from meddiff.train import TrainConfig, train

    ae = tmp_path / "autoencoders" / "other"
    shutil.copytree(vae_uri, ae)
    card = json.loads((ae / "model.json").read_text())
    (ae / "model.json").write_text(json.dumps({**card, **change}))
    with pytest.raises(MeddiffError, match=message):
        train(TrainConfig(breastmnist_uri, steps=2, device="cpu", latent=str(ae)), str(tmp_path))
    assert not (tmp_path / "models").exists()


def test_latent_model_without_or_with_a_corrupt_autoencoder(latent_conditional_uri, vae_uri, tmp_path):
    from meddiff.generate import CohortSpec, generate

    model = tmp_path / "models" / "m"
    shutil.copytree(latent_conditional_uri, model)
    ae_copy = tmp_path / "autoencoders" / "a"
    shutil.copytree(vae_uri, ae_copy)
    card = json.loads((model / "model.json").read_text())
    for ae_uri, message in ((str(tmp_path / "gone"), "not a finished autoencoder"), (str(ae_copy), "corrupt")):
        card["latent"]["uri"] = ae_uri
        (model / "model.json").write_text(json.dumps(card))
        (ae_copy / "weights.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(ArtifactError, match=message):
            generate(CohortSpec(str(model), per_class=1, steps=2, device="cpu"), str(tmp_path))
    assert not (tmp_path / "cohorts").exists()


def test_a_latent_model_finds_its_autoencoder_in_a_moved_storage_root(latent_conditional_uri, vae_uri, tmp_path):
    """A latent model's card names its autoencoder by path: after the storage root moved, loading the
    model failed ('<old path> ... not a finished autoencoder'), so nothing could be generated from it."""
    import numpy as np

    from meddiff.data.cohorts import open_cohort
    from meddiff.evaluate.loading import load_cohort_images
    from meddiff.generate import CohortSpec, generate
    from meddiff.models.trained import load_model

    old, new = tmp_path / "old", tmp_path / "new"
    model, ae = old / "models" / Path(latent_conditional_uri).name, old / "autoencoders" / Path(vae_uri).name
    shutil.copytree(latent_conditional_uri, model)
    shutil.copytree(vae_uri, ae)
    card = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**card, "latent": {**card["latent"], "uri": str(ae)}}))  # made there
    shutil.move(old, new)
    moved = load_model(str(new / "models" / model.name), "cpu")
    assert moved.autoencoder.uri == str(new / "autoencoders" / ae.name)

    def images(model_uri: str, root: Path) -> np.ndarray:
        cohort = open_cohort(generate(CohortSpec(model_uri, per_class=2, steps=2, device="cpu"), str(root)).uri)
        return load_cohort_images(cohort, cohort.manifest().sort_values("sample_id")).x

    assert np.array_equal(images(moved.uri, new), images(latent_conditional_uri, tmp_path / "original"))


def test_a_latent_run_resumes_in_a_copied_root_and_writes_the_same_bytes(breastmnist_uri, vae_uri, session_storage,
                                                                        tmp_path):
    """Checkpoints of a latent run kept its autoencoder's URI: in a copied or moved root (or on a worker
    that mounts the storage elsewhere) the run could not resume ('has a different latent'), and the same
    training wrote other bytes there, so its weights got another sha256 and its cohorts other ids."""
    from meddiff.train import TrainConfig, train

    inputs = [Path(uri).relative_to(session_storage) for uri in (breastmnist_uri, vae_uri)]  # same layout

    def run(root: Path):
        ds, ae = (str(root / rel) for rel in inputs)
        return train(TrainConfig(ds, steps=2, batch_size=8, device="cpu", preview_steps=2, objective="rflow",
                                 latent=ae, cpu_threads=1), str(root))

    a, copy, b = tmp_path / "a", tmp_path / "copy", tmp_path / "b"
    for root in (a, b):
        for rel in inputs:
            shutil.copytree(Path(session_storage) / rel, root / rel)
    first = run(a)
    shutil.copytree(a, copy)
    (copy / "models" / Path(first.uri).name / "model.json").unlink()  # all but its card: the re-run resumes
    resumed = run(copy)
    assert not resumed.existed and resumed.card["checkpoint_sha256"] == first.card["checkpoint_sha256"]
    assert resumed.card["latent"]["uri"] == str(copy / inputs[1])  # the card says where the autoencoder is now
    fresh = run(b)  # the same training from scratch in another root
    assert fresh.card["checkpoint_sha256"] == first.card["checkpoint_sha256"]


def test_latent_model_scores_anomalies_in_latent_space_and_refuses_a_likelihood(latent_conditional_uri,
                                                                                 breastmnist_uri, session_storage):
    """Both once crashed on the first convolution (images given to a latent network); anomaly scores now
    noise and denoise E(x) and decode, and bits/dim of latents is refused (not an image likelihood)."""
    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies
    from meddiff.analysis.reconstruct import reconstruct
    from meddiff.data.shards import open_dataset
    from meddiff.models.likelihood import likelihood
    from meddiff.models.trained import load_model

    x, _ = open_dataset(breastmnist_uri).load_split("val")
    model = load_model(latent_conditional_uri, "cpu")
    rec = reconstruct(model, x[:6], 0, 0.3, 3, 1.0, seed=0, batch_size=4)
    assert rec.shape == x[:6].shape and 0 <= rec.min() and rec.max() <= 1
    whole = reconstruct(model, x[:6], 0, 0.3, 3, 1.0, seed=0, batch_size=6)
    assert np.abs(rec - whole).max() < 1e-5  # each image's own noise: independent of the batching
    rec_ae = (model.autoencoder.from_latent(model.autoencoder.to_latent(torch.from_numpy(x[:6]).float() / 127.5 - 1))
              + 1) / 2
    assert np.abs(rec - rec_ae.numpy()).mean() < 0.25  # near the autoencoder's own reconstruction at level 0.3
    rec_full = reconstruct(model, x[:6], 0, 1.0, 3, 1.0, seed=0)
    assert np.abs(rec - x[:6] / 255).mean() < np.abs(rec_full - x[:6] / 255).mean()  # less noise, closer to x
    out = detect_anomalies(latent_conditional_uri, breastmnist_uri,
                           AnomalyConfig(normal="1", level=0.3, steps=2, max_images=40, device="cpu"), session_storage)
    assert 0 <= out["auroc"]["pixel"]["all anomalies"]["auroc"] <= 1
    with pytest.raises(MeddiffError, match="is a latent diffusion model: its bound would be in bits per dimension"):
        likelihood(latent_conditional_uri, breastmnist_uri)


def test_models_show_and_list_cover_latent_models_and_autoencoders(latent_conditional_uri, vae_uri, breastmnist_uri,
                                                                    session_storage, tmp_path):
    from typer.testing import CliRunner

    from meddiff.cli import app

    runner = CliRunner()
    model = runner.invoke(app, ["models", "show", latent_conditional_uri], env={"COLUMNS": "200"})
    assert model.exit_code == 0, model.output
    assert f"{vae_uri} (latent 4×7×7)" in model.output and "cross-attention" in model.output
    ae = runner.invoke(app, ["models", "show", vae_uri], env={"COLUMNS": "400"})
    assert ae.exit_code == 0 and "4×7×7 (scale factor" in ae.output and "val L1" in ae.output, ae.output
    threads = json.loads((Path(vae_uri) / "model.json").read_text())["sessions"][0]["cpu_threads"]
    assert re.search(rf"steps 0–{AE_KW['steps']} on cpu, {threads} CPU threads? \(\w+\) — to write these exact "
                     rf"weights again on a CPU: --threads {threads} ", ae.output), ae.output
    # a root moved elsewhere: the card still names the autoencoder and dataset by their old URIs
    moved = tmp_path / "root" / "models" / Path(latent_conditional_uri).name
    shutil.copytree(latent_conditional_uri, moved)
    shutil.copytree(vae_uri, tmp_path / "root" / "autoencoders" / Path(vae_uri).name)
    card = json.loads((moved / "model.json").read_text())
    card["latent"]["uri"] = f"/old/root/autoencoders/{Path(vae_uri).name}"
    card["dataset"]["uri"] = "/old/root/datasets/breastmnist/v1"
    (moved / "model.json").write_text(json.dumps(card))
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in runner.invoke(
        app, ["models", "show", str(moved)], env={"COLUMNS": "400"}).output.splitlines() if line.count("│") == 3}
    assert rows["latent"] == f"{tmp_path / 'root' / 'autoencoders' / Path(vae_uri).name} (latent 4×7×7)"
    assert rows["dataset"] == "/old/root/datasets/breastmnist/v1 (not there now: moved or deleted)"
    assert rows["classes"] == "0 malignant; 1 normal, benign"  # was "malignant, normal, benign": 2 or 3?
    wrong = runner.invoke(app, ["models", "show", breastmnist_uri])
    assert wrong.exit_code != 0 and "is a dataset version, not what this command takes" in str(wrong.exception)
    listed = runner.invoke(app, ["models", "list", "--storage", session_storage], env={"COLUMNS": "300"}).output
    assert vae_uri in listed and "autoencoder (vae)" in listed and latent_conditional_uri in listed


def test_cross_attention_only_for_conditional_models(breastmnist_uri):
    from meddiff.train import TrainConfig

    with pytest.raises(MeddiffError, match="--conditioning applies to conditional"):
        TrainConfig(breastmnist_uri, mode="per-class", conditioning="cross-attention").check()
    with pytest.raises(MeddiffError, match="conditioning must be one of"):
        TrainConfig(breastmnist_uri, conditioning="film").check()


def test_cli_train_autoencoder_finds_the_trained_run(breastmnist_uri, vae_uri, session_storage):
    from typer.testing import CliRunner

    from meddiff.cli import app

    res = CliRunner().invoke(app, ["train-autoencoder", breastmnist_uri, "--kind", "vae", "--steps", "6",
                                   "--batch-size", "8", "--adv-warmup-steps", "3", "--device", "cpu",
                                   "--storage", session_storage])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == vae_uri


@pytest.mark.slow
def test_latent_pipeline_flow_runs_then_skips_every_stage(prefect_harness, medmnist_dir, tmp_path):
    """Through the Prefect flow, as `meddiff pipeline --latent vae` runs it (its progress callbacks once
    knew no 'train-autoencoder' stage: every latent pipeline died with a KeyError before training)."""
    from flows.pipeline import pipeline

    params = dict(dataset="medmnist:breastmnist", medmnist_root=str(medmnist_dir), steps=3, batch_size=8,
                  preview_steps=2, per_class=2, sample_steps=2, device="cpu", evaluate=False, domain_steps=5,
                  latent="vae", ae_steps=3, latent_umap=False, storage_root=str(tmp_path))
    first = pipeline(**params)
    assert [s["stage"] for s in first["stages"]] == ["ingest", "train-autoencoder", "encode", "train", "generate"]
    assert not any(s["existed"] for s in first["stages"][1:])
    card = json.loads((Path(first["model_uri"]) / "model.json").read_text())
    assert card["latent"]["uri"] == first["stages"][1]["uri"]
    second = pipeline(**params)
    assert all(s["existed"] for s in second["stages"]) and second["cohort_uri"] == first["cohort_uri"]


def test_train_autoencoder_flow_finds_the_trained_run(prefect_harness, breastmnist_uri, vae_uri, session_storage):
    from flows.train_autoencoder import train_autoencoder

    assert train_autoencoder(breastmnist_uri, kind="vae", steps=6, batch_size=8, adv_warmup_steps=3, device="cpu",
                             storage_root=session_storage) == vae_uri
    # a deployment run with an empty dataset (the server accepts "") is told which parameter, in one line
    with pytest.raises(MeddiffError, match="dataset_uri is empty: pass --param dataset_uri=<URI>"):
        train_autoencoder(" ", storage_root=session_storage)


def test_perceptual_loss_reads_local_backbone_weights_only(tmp_path):
    import torchvision

    from meddiff.models.perceptual import PerceptualLoss

    torch.manual_seed(0)
    feats = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in feats.items()}, tmp_path / "alexnet.pt")
    loss = PerceptualLoss(str(tmp_path / "alexnet.pt"))
    x = torch.rand(2, 1, 64, 64) * 2 - 1  # grey images are replicated to RGB
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, x.flip(-1)).item() > 0
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(MeddiffError, match="AlexNet or VGG16"):
        PerceptualLoss(str(tmp_path / "other.pt"))


def test_autoencoder_checkpoints_name_the_perceptual_weights_by_content(breastmnist_uri, tmp_path):
    """An autoencoder checkpoint kept the perceptual-loss weights' path in its config, so the same training
    with the same file at another path wrote other bytes."""
    import torchvision

    from meddiff.records import sha256_file
    from meddiff.train.ae_config import AETrainConfig, plan_autoencoder

    feats = torchvision.models.alexnet(weights=None).features.state_dict()
    for d in ("here", "there"):
        (tmp_path / d).mkdir()
        torch.save({f"features.{k}": v for k, v in feats.items()}, tmp_path / d / "alexnet.pt")
    here, there = (plan_autoencoder(AETrainConfig(breastmnist_uri, perceptual_weights=str(tmp_path / d / "alexnet.pt"),
                                                  **AE_KW), str(tmp_path)) for d in ("here", "there"))
    assert here.run_id == there.run_id
    assert here.portable_record() == there.portable_record()
    assert here.portable_record()["perceptual_weights"] == sha256_file(tmp_path / "here" / "alexnet.pt")


def test_reconstruction_lpips_with_local_weights_on_28px_images(breastmnist_uri, tmp_path):
    """LPIPS in the reconstruction report exists only with local weights; 28 px images are up-sampled
    for AlexNet's pooling (a 28 px input used to crash it)."""
    import torchvision

    from meddiff.data.shards import open_dataset
    from meddiff.evaluate.reconstruction import perceptual_metrics

    torch.manual_seed(0)
    feats = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in feats.items()}, tmp_path / "alexnet.pt")
    x, _ = open_dataset(breastmnist_uri).load_split("val")
    x = x[:20]
    same = perceptual_metrics(x, x, str(tmp_path / "alexnet.pt"), "cpu")
    assert same["lpips"]["mean"] == pytest.approx(0.0, abs=1e-6) and "alexnet" in same["lpips_note"]
    noisy = np.clip(x.astype(int) + np.random.default_rng(0).integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    worse = perceptual_metrics(x, noisy, str(tmp_path / "alexnet.pt"), "cpu")
    assert worse["lpips"]["mean"] > 0 and worse["lpips"]["n"] == 20
    assert perceptual_metrics(x, x, None, "cpu")["lpips"] is None
