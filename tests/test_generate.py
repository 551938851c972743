"""Cohort generation from tiny models trained in the session on real BloodMNIST/BreastMNIST."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meddiff.data.cohorts import open_cohort, verify, write_quality
from meddiff.errors import ArtifactError, MeddiffError
from meddiff.generate import CohortSpec, generate, regenerate
from meddiff.generate.sampling import resolve_sampler
from meddiff.models.trained import load_model
from meddiff.data.shards import iter_shard

STEPS = 4  # reverse steps: enough to exercise every code path, cheap on CPU


def spec(model_uri: str, **kw) -> CohortSpec:
    return CohortSpec(model_uri, **{"steps": STEPS, "batch_size": 16, "device": "cpu", **kw})


def test_per_class_quota_exact_and_verified(tiny_conditional_model_uri, bloodmnist_uri, tmp_path):
    r = generate(spec(tiny_conditional_model_uri, per_class=3, shard_size=10), str(tmp_path))
    card = r.card
    assert card["dataset_uri"] == bloodmnist_uri and card["model_uri"] == tiny_conditional_model_uri
    assert len(card["class_names"]) == 8 and r.counts == {c: 3 for c in card["class_names"]}
    assert card["shards"] == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic-000002.tar"]
    v = verify(r.uri)
    assert v.ok, v.problems
    df = open_cohort(r.uri).manifest()
    assert df["class_id"].value_counts().to_dict() == {i: 3 for i in range(8)}
    assert df["seed"].is_unique and df["guidance_scale"].eq(2.0).all()
    assert df["flagged"].isna().all()  # quality columns wait for evaluate
    for f in ("grids/class-0.png", "grids/class-7.png", "reverse_diffusion.png", "reverse_diffusion.gif"):
        assert (Path(r.uri) / f).stat().st_size > 0
    again = generate(spec(tiny_conditional_model_uri, per_class=3, shard_size=10), str(tmp_path))
    assert again.existed and again.uri == r.uri


def test_cohort_id_does_not_depend_on_where_the_model_is_stored(tiny_conditional_model_uri, tmp_path):
    """The cohort's id once hashed the model's absolute URI: the same model in another clone, on another
    worker's mount or under a moved storage root made a new cohort id, so a re-run generated it again."""
    import shutil

    from meddiff.data.cohorts import stored_png

    moved = tmp_path / "b" / "models" / Path(tiny_conditional_model_uri).name
    shutil.copytree(tiny_conditional_model_uri, moved)
    here = generate(spec(tiny_conditional_model_uri, per_class=1), str(tmp_path / "a"))
    there = generate(spec(str(moved), per_class=1), str(tmp_path / "b"))
    assert Path(here.uri).name == Path(there.uri).name
    images = [open_cohort(r.uri).manifest().set_index("key")["image_sha256"] for r in (here, there)]
    assert len(images[0]) == 8 and images[0].equals(images[1])  # the same images (each records its model_uri)
    # the whole root moved (model and cohort): regenerate follows the recorded model_uri to the new root
    (tmp_path / "b").rename(tmp_path / "c")
    cohort = str(tmp_path / "c" / "cohorts" / Path(there.uri).name)
    assert regenerate(cohort, 3) == stored_png(cohort, 3)
    # and `cohorts show` prints where the model is now, not the path it had (it printed a path that was gone)
    from typer.testing import CliRunner

    from meddiff.cli import app

    shown = CliRunner().invoke(app, ["cohorts", "show", cohort])
    assert shown.exit_code == 0, shown.output
    assert f"model_uri: {tmp_path / 'c' / 'models' / moved.name}\n" in shown.output
    (tmp_path / "c" / "models").rename(tmp_path / "c" / "gone")
    assert f"model_uri: {moved} (not there now: moved or deleted)\n" in \
        CliRunner().invoke(app, ["cohorts", "show", cohort]).output


def test_records_name_artifacts_by_absolute_paths_whatever_the_cwd(tiny_conditional_model_uri, breastmnist_uri,
                                                                  tmp_path, monkeypatch):
    """`meddiff generate storage/models/X` wrote model_uri 'storage/models/X' into cohort.json and every
    manifest row, and `meddiff train storage/datasets/...` its dataset so into model.json: downstream
    readers (another directory, another machine's mount) could not tell where the artifacts were."""
    import json
    import os

    from meddiff.train import TrainConfig, train

    model = Path(tiny_conditional_model_uri)
    monkeypatch.chdir(model.parent.parent.parent)
    rel_model = os.path.relpath(model)
    r = generate(spec(rel_model, per_class=1), str(tmp_path))
    assert r.card["model_uri"] == tiny_conditional_model_uri and Path(r.card["dataset_uri"]).is_absolute()
    assert set(open_cohort(r.uri).manifest()["model_uri"]) == {tiny_conditional_model_uri}
    assert open_cohort(os.path.relpath(r.uri)).uri == r.uri
    monkeypatch.chdir(Path(breastmnist_uri).parent.parent)
    trained = train(TrainConfig("breastmnist/" + Path(breastmnist_uri).name, steps=2, batch_size=8, device="cpu",
                                preview_steps=2), str(tmp_path))
    assert json.loads((Path(trained.uri) / "model.json").read_text())["dataset"]["uri"] == breastmnist_uri


def test_a_cohort_made_under_the_old_id_is_still_found(tiny_conditional_model_uri, tmp_path):
    """Cohorts made before the change (id and spec.json naming the model by its URI) are reused where
    their storage has not moved, not generated again under the new id."""
    import json

    from meddiff.generate.cohort import legacy_identity
    from meddiff.records import content_hash

    made = generate(spec(tiny_conditional_model_uri, per_class=1), str(tmp_path))
    ident = json.loads((Path(made.uri) / "spec.json").read_text())
    legacy = legacy_identity(ident, load_model(tiny_conditional_model_uri, "cpu"))
    assert legacy["model_uri"] == tiny_conditional_model_uri and "model" not in legacy
    old = Path(made.uri).with_name(f"{Path(tiny_conditional_model_uri).name}-{content_hash(legacy)}")
    Path(made.uri).rename(old)
    (old / "spec.json").write_text(json.dumps(legacy))
    again = generate(spec(tiny_conditional_model_uri, per_class=1), str(tmp_path))
    assert again.existed and again.uri == str(old) and not Path(made.uri).exists()


def test_total_balanced_and_ratios(tiny_conditional_model_uri, tiny_per_class_model_uri, tmp_path):
    r = generate(spec(tiny_conditional_model_uri, total=10), str(tmp_path))
    assert list(r.counts.values()) == [2, 2, 1, 1, 1, 1, 1, 1]
    r = generate(spec(tiny_per_class_model_uri, total=8, ratios="malignant=1,normal, benign=3", sampler="ddpm"),
                 str(tmp_path))
    assert r.counts == {"malignant": 2, "normal, benign": 6}
    df = open_cohort(r.uri).manifest()
    assert df.groupby("class_name")["checkpoint_sha256"].nunique().eq(1).all()  # one checkpoint per class model
    assert df["checkpoint_sha256"].nunique() == 2 and df["guidance_scale"].isna().all()
    assert verify(r.uri).ok


def _pixels(uri: str) -> np.ndarray:
    """(N, C, H, W) in sample-id order (shards are written class-interleaved, not in id order)."""
    from meddiff.data.images import decode_png

    cohort = open_cohort(uri)
    by_key = {s["__key__"]: decode_png(s["png"]) for u in cohort.shard_uris() for s in iter_shard(u)}
    return np.stack([by_key[k] for k in cohort.manifest().sort_values("sample_id")["key"]]).astype(int)


def test_single_sample_regenerates_identically(tiny_conditional_model_uri, tmp_path):
    a = generate(spec(tiny_conditional_model_uri, per_class=2, batch_size=3, sampler="ddpm", name="a"), str(tmp_path))
    b = generate(spec(tiny_conditional_model_uri, per_class=2, batch_size=16, sampler="ddpm", name="b"), str(tmp_path))
    ma = open_cohort(a.uri).manifest()
    assert ma["image_sha256"].nunique() == len(ma)  # different seeds → different images
    # the batch size changes speed, not the image: the same pixels up to CPU kernels' last bits
    pa, pb = _pixels(a.uri), _pixels(b.uri)
    assert np.abs(pa - pb).max() <= 1 and (pa != pb).mean() < 1e-3
    for sid in (0, 4, 8, 15):  # first, middle and last positions of batches of 3
        row = ma.iloc[sid]
        stored = next(s["png"] for s in iter_shard(f"{a.uri}/{row['shard']}") if s["__key__"] == row["key"])
        assert regenerate(a.uri, sid, device="cpu") == stored
    alone = regenerate(a.uri, 8, device="cpu", alone=True)
    from meddiff.data.images import decode_png
    assert np.abs(decode_png(alone).astype(int) - pa[8]).max() <= 1


def generate_until_a_shard(model_uri: str, root: Path, name: str, total: int, **popen) -> tuple[subprocess.Popen, Path]:
    """`meddiff generate` (shards of 8, 25 steps) in a subprocess; returns once a shard is committed (or it ended)."""
    args = ["--total", str(total), "--steps", "25", "--shard-size", "8", "--batch-size", "8", "--device", "cpu",
            "--name", name, "--storage", str(root)]
    proc = subprocess.Popen([sys.executable, "-m", "meddiff", "generate", model_uri, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    parts = root / "cohorts" / name / "parts"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(parts.glob("*.parquet")) and proc.poll() is None:
        time.sleep(0.05)
    return proc, parts


def test_sigkill_then_resume_gives_exact_verified_cohort(tiny_conditional_model_uri, tmp_path):
    root = tmp_path / "st"
    proc, parts = generate_until_a_shard(tiny_conditional_model_uri, root, "killed", 32, start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(parts.glob("*.parquet")))
    assert 1 <= committed < 4, f"kill landed at {committed} of 4 shards: {proc.stderr.read()[-500:]}"
    assert not (root / "cohorts" / "killed" / "cohort.json").exists()
    with pytest.raises(ArtifactError, match="incomplete"):
        open_cohort(str(root / "cohorts" / "killed"))
    r = generate(CohortSpec(tiny_conditional_model_uri, total=32, steps=25, shard_size=8, batch_size=8,
                            device="cpu", name="killed"), str(root))
    assert r.card["resumed_samples"] == committed * 8
    assert sum(r.counts.values()) == 32 and verify(r.uri).ok
    df = open_cohort(r.uri).manifest()
    assert df["sample_id"].tolist() == list(range(32)) and df["key"].is_unique


def test_ctrl_c_keeps_committed_shards_and_says_how_to_resume(tiny_conditional_model_uri, tmp_path):
    """Ctrl-C used to exit 130 without a word about what was kept."""
    root = tmp_path / "st"
    proc, parts = generate_until_a_shard(tiny_conditional_model_uri, root, "stopped", 48)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    committed = len(list(parts.glob("*.parquet")))
    assert proc.returncode == 130 and 1 <= committed < 6, f"{committed} of 6 shards: {err[-500:]}"
    assert err.strip().splitlines()[-1] == (
        f"interrupted: stopped with {committed} of 6 shards committed ({root / 'cohorts' / 'stopped'}); the shard "
        "in progress is discarded: re-run the same command to resume from there")
    assert not (root / "cohorts" / "stopped" / "cohort.json").exists()
    from told import Told

    told = Told()  # what the library tells its user (meddiff.progress.tell)
    r = generate(CohortSpec(tiny_conditional_model_uri, total=48, steps=25, shard_size=8, batch_size=8,
                            device="cpu", name="stopped"), str(root), told)
    assert r.card["resumed_samples"] == committed * 8 and sum(r.counts.values()) == 48 and verify(r.uri).ok
    assert told == [f"resuming: {committed} of 6 shards already committed; generating the other {6 - committed}"]


def test_consumer_dataset_labels_filters_and_mixing(tiny_conditional_model_uri, bloodmnist_uri, tmp_path):
    from meddiff.data.consumer import ShardDataset

    r = generate(spec(tiny_conditional_model_uri, per_class=4), str(tmp_path))
    df = open_cohort(r.uri).manifest()
    items = list(ShardDataset(r.uri))
    assert sorted(label for _, label in items) == sorted(df["class_id"].tolist())
    assert tuple(items[0][0].shape) == (3, 28, 28)
    assert {label for _, label in ShardDataset(r.uri, classes=["basophil", 7])} == {0, 7}
    flagged = pd.DataFrame({"flagged": [True, True]}, index=pd.Index([0, 1], name="sample_id"))
    write_quality(r.uri, flagged)
    assert len(list(ShardDataset(r.uri, exclude_flagged=True))) == 30
    assert len(list(ShardDataset(r.uri, exclude_flagged=False))) == 32
    mixed = list(ShardDataset(r.uri, exclude_flagged=False, mix_with=bloodmnist_uri, mix_ratio=0.5))
    assert len(mixed) == 64
    assert sum(1 for x, _ in mixed if any(np.array_equal(x.numpy(), y.numpy()) for y, _ in items)) == 32


def test_bad_input(tiny_conditional_model_uri, tiny_per_class_model_uri, tmp_path):
    root = str(tmp_path)
    with pytest.raises(MeddiffError, match="unknown class 'nosuch'"):
        generate(spec(tiny_conditional_model_uri, total=10, ratios="nosuch=1"), root)
    # one class named with 0.3 had meant 100 % of that class; a share is now read as a share or refused
    with pytest.raises(MeddiffError, match=r"names 1 of 8 classes and sums to 0.3: .*basophil, eosinophil"):
        generate(spec(tiny_conditional_model_uri, total=10, ratios="neutrophil=0.3"), root)
    names = ["malignant", "normal, benign"]
    assert spec("m", total=10, ratios="malignant=1").quotas(names) == {"malignant": 10, "normal, benign": 0}
    assert spec("m", total=9, ratios="malignant=2,normal, benign=1").quotas(names) == {"malignant": 6,
                                                                                       "normal, benign": 3}
    for kw in ({"per_class": 0}, {"total": -5}, {"per_class": 2, "total": 4}, {}):
        with pytest.raises(MeddiffError):
            generate(spec(tiny_conditional_model_uri, **kw), root)
    with pytest.raises(MeddiffError, match="guidance applies to conditional"):
        generate(spec(tiny_per_class_model_uri, per_class=1, guidance=3.0), root)
    # scale 0 is ε(x_t, ∅) alone: unconditional images labelled with classes (was written as a cohort)
    with pytest.raises(MeddiffError, match="--guidance 0 samples ignore their class.*--unconditional --total N"):
        generate(spec(tiny_conditional_model_uri, per_class=1, guidance=0.0), root)
    with pytest.raises(MeddiffError, match="rflow"):
        generate(spec(tiny_conditional_model_uri, per_class=1, sampler="rflow"), root)
    with pytest.raises(ArtifactError, match="does not exist"):
        generate(spec(str(tmp_path / "models" / "nope"), per_class=1), root)
    incomplete = tmp_path / "models" / "half"
    incomplete.mkdir(parents=True)
    with pytest.raises(ArtifactError, match="incomplete"):
        generate(spec(str(incomplete), per_class=1), root)
    generate(spec(tiny_conditional_model_uri, per_class=1, name="mine"), root)
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cohorts" / "mine").rglob("*") if p.is_file())
    with pytest.raises(MeddiffError, match="different spec"):
        generate(spec(tiny_conditional_model_uri, per_class=2, name="mine"), root)
    after = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cohorts" / "mine").rglob("*") if p.is_file())
    assert before == after  # nothing overwritten


def _assert_listings_stay_light(models_root: str, cohorts_root: str) -> None:
    """The three listings, on real artifacts, in a fresh interpreter: they read cards only, so torch (via
    webdataset) and pandas stay unloaded. `cohorts list` took 2.8 s on the 2-core CPU with no cohort at all."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from meddiff.cli import app; r = CliRunner(); "
            f"outs = [r.invoke(app, [kind, 'list', '--storage', root]).output for kind, root in "
            f"(('datasets', {models_root!r}), ('models', {models_root!r}), ('cohorts', {cohorts_root!r}))]; "
            "print(repr(outs)); "
            "print(sorted(m for m in ('torch', 'monai', 'pandas', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    listed, loaded = out.stdout.strip().splitlines()[-2:]
    assert "bloodmnist" in listed and "complete" in listed  # the listings did list the real artifacts
    assert loaded == "[]"


def test_cli_generate_and_verify_detects_tampering(tiny_conditional_model_uri, session_storage, tmp_path):
    from typer.testing import CliRunner

    from meddiff.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["generate", tiny_conditional_model_uri, "--per-class", "2", "--steps", str(STEPS),
                              "--device", "cpu", "--storage", str(tmp_path)])
    assert res.exit_code == 0, res.output
    uri = res.output.strip().splitlines()[-1]
    assert "basophil" in res.output and open_cohort(uri).card["total"] == 16
    assert runner.invoke(app, ["cohorts", "verify", uri]).exit_code == 0
    assert "complete" in runner.invoke(app, ["cohorts", "list", "--storage", str(tmp_path)]).output
    _assert_listings_stay_light(session_storage, str(tmp_path))
    shard = Path(uri) / "synthetic-000000.tar"
    data = bytearray(shard.read_bytes())
    idx = data.find(b"\x89PNG") + 200  # flip a byte inside the first image's compressed data
    data[idx] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = runner.invoke(app, ["cohorts", "verify", uri])
    assert res.exit_code == 1 and "sha256 differs" in res.output


def test_cli_table_title_keeps_the_cohort_id_whole(tiny_per_class_model_uri, tmp_path):
    from typer.testing import CliRunner

    from meddiff.cli import app

    res = CliRunner().invoke(app, ["generate", tiny_per_class_model_uri, "--per-class", "1", "--steps", "2",
                                   "--device", "cpu", "--storage", str(tmp_path)])
    assert res.exit_code == 0, res.output
    uri = res.output.strip().splitlines()[-1]
    # the title names the id a user copies; it wrapped at the narrow class/images columns ("…-con / ditional-…")
    assert f"cohort {Path(uri).name}" in [line.strip() for line in res.output.splitlines()]


def test_generate_flow(prefect_harness, tiny_per_class_model_uri, tmp_path):
    from flows.generate_cohort import generate_cohort

    uri = generate_cohort(model_uri=tiny_per_class_model_uri, per_class=2, steps=STEPS, device="cpu",
                          evaluate=False, storage_root=str(tmp_path))
    assert verify(uri).ok and open_cohort(uri).card["counts"] == {"malignant": 2, "normal, benign": 2}
    with pytest.raises(MeddiffError, match="no CUDA GPU"):
        generate_cohort(model_uri=tiny_per_class_model_uri, per_class=1, device="cuda", evaluate=False,
                        storage_root=str(tmp_path))


def _stored_png(uri: str, sample_id: int) -> bytes:
    row = open_cohort(uri).manifest().set_index("sample_id").loc[sample_id]
    return next(s["png"] for s in iter_shard(f"{uri}/{row['shard']}") if s["__key__"] == row["key"])


@pytest.mark.parametrize("sampler", ["dpmpp2m", "heun"])
def test_cli_second_order_samplers_verify_and_regenerate_exactly(sampler, tiny_conditional_model_uri,
                                                                tiny_rflow_model_uri, tmp_path):
    """What a new user runs: generate with a 2nd-order sampler at 7 steps, verify, regenerate a sample."""
    from typer.testing import CliRunner

    from meddiff.cli import app

    model = tiny_conditional_model_uri if sampler == "dpmpp2m" else tiny_rflow_model_uri
    runner = CliRunner()
    res = runner.invoke(app, ["generate", model, "--per-class", "3", "--sampler", sampler, "--steps", "7",
                              "--batch-size", "4", "--device", "cpu", "--storage", str(tmp_path)])
    assert res.exit_code == 0, res.output
    uri = res.output.strip().splitlines()[-1]
    card = open_cohort(uri).card
    assert (card["sampler"], card["steps"], card["device_type"], card["autocast"]) == (sampler, 7, "cpu", "float32")
    assert card["guidance_scale"] == (2.0 if sampler == "dpmpp2m" else 1.0)  # rflow model: label_dropout 0
    assert runner.invoke(app, ["cohorts", "verify", uri]).exit_code == 0
    assert open_cohort(uri).manifest()["image_sha256"].is_unique
    for sid in (0, 5):  # a sample in the first batch and one in the middle of the second
        out = tmp_path / "new folder" / f"{sid}.png"  # --out's folder is created (it was a traceback)
        res = runner.invoke(app, ["cohorts", "regenerate", uri, str(sid), "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert out.read_bytes() == _stored_png(uri, sid)
        assert "identical to the stored image" in res.output  # it says so, rather than leaving the user to diff


def test_cli_regenerate_says_when_it_differs(tiny_conditional_model_uri, tmp_path, monkeypatch):
    """A regenerated image that is not the stored one (another device type, a changed environment) is
    reported with its size (pixels, grey levels) and exit status 1; with --alone a difference is expected."""
    from typer.testing import CliRunner

    import meddiff.generate
    from meddiff.cli import app
    from meddiff.data.images import decode_png, encode_png

    runner = CliRunner()
    res = runner.invoke(app, ["generate", tiny_conditional_model_uri, "--per-class", "1", "--steps", "2",
                              "--device", "cpu", "--storage", str(tmp_path)])
    uri = res.output.strip().splitlines()[-1]
    real = meddiff.generate.regenerate

    def off_by_one(*args, **kwargs):  # what another device's last bits do to one pixel
        x = decode_png(real(*args, **kwargs)).transpose(1, 2, 0).copy()  # (H, W, C)
        x[0, 0] = np.where(x[0, 0] < 255, x[0, 0] + 1, x[0, 0] - 1)
        return encode_png(x)

    monkeypatch.setattr(meddiff.generate, "regenerate", off_by_one)
    res = runner.invoke(app, ["cohorts", "regenerate", uri, "2", "--out", str(tmp_path / "2.png")])
    assert res.exit_code == 1 and "differs from the stored image: " in res.output
    assert "by at most 1 grey level(s)" in res.output
    res = runner.invoke(app, ["cohorts", "regenerate", uri, "2", "--out", str(tmp_path / "2a.png"), "--alone"])
    assert res.exit_code == 0 and "(expected with --alone)" in res.output


def test_guidance_refused_without_label_dropout_and_auto_sampler(tiny_rflow_model_uri, tmp_path):
    with pytest.raises(MeddiffError, match="label_dropout 0"):
        generate(spec(tiny_rflow_model_uri, per_class=1, guidance=2.0), str(tmp_path))
    with pytest.raises(MeddiffError, match=r"rflow \| heun"):
        generate(spec(tiny_rflow_model_uri, per_class=1, sampler="dpmpp2m"), str(tmp_path))
    r = generate(spec(tiny_rflow_model_uri, per_class=1), str(tmp_path))
    assert r.card["sampler"] == "heun" and r.card["guidance_scale"] == 1.0


def test_regenerate_warns_when_the_recorded_device_cannot_be_matched(tiny_conditional_model_uri, tmp_path):
    from meddiff.data.cohorts import open_cohort as _open
    from meddiff.generate.cohort import regenerate_device

    r = generate(spec(tiny_conditional_model_uri, per_class=1), str(tmp_path))
    card = dict(_open(r.uri).card, device_type="cuda", autocast="bfloat16")  # as if made on a GPU
    with pytest.warns(UserWarning, match="made on cuda"):
        assert regenerate_device(card, "cpu").type == "cpu"
    old = {k: v for k, v in card.items() if k not in ("device_type", "autocast")}  # a card from before issue 11
    with pytest.warns(UserWarning, match="predates"):
        regenerate_device(old, None)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert regenerate_device(_open(r.uri).card, None).type == "cpu"  # recorded cpu: silent


def test_unconditional_cohort_of_a_conditional_model(tiny_conditional_model_uri, tmp_path):
    """--unconditional: the null label, no class asked; the manifest says "(unknown)"; regenerate stays exact."""
    from meddiff.data.cohorts import UNKNOWN_CLASS
    from meddiff.data.images import decode_png
    from meddiff.generate.sampling import generate_images
    from meddiff.models.trained import load_model

    r = generate(spec(tiny_conditional_model_uri, total=12, shard_size=5, unconditional=True), str(tmp_path))
    assert r.counts == {UNKNOWN_CLASS: 12} and r.card["unconditional"] is True and r.card["guidance_scale"] is None
    assert verify(r.uri).ok
    df = open_cohort(r.uri).manifest()
    assert (df["class_id"] == -1).all() and (df["class_name"] == UNKNOWN_CLASS).all()
    assert df["guidance_scale"].isna().all() and df["seed"].is_unique
    assert (Path(r.uri) / "grids" / "unconditional.png").stat().st_size > 0
    row = df.set_index("sample_id").loc[7]
    stored = next(s["png"] for s in iter_shard(f"{r.uri}/{row['shard']}") if s["__key__"] == row["key"])
    assert regenerate(r.uri, 7, device="cpu") == stored
    # the images are the null label's, not some class's: same seeds with class 0 give other pixels
    model = load_model(tiny_conditional_model_uri, "cpu")
    import torch
    seeds = df.sort_values("sample_id")["seed"].head(4).astype(int).tolist()
    sampler = r.card["sampler"]  # what auto resolved to
    null = generate_images(model, [-1] * 4, seeds, sampler, STEPS, None, torch.device("cpu"))
    cls0 = generate_images(model, [0] * 4, seeds, sampler, STEPS, 1.0, torch.device("cpu"))
    assert not torch.equal(null, cls0)
    first = df.sort_values("sample_id").head(4)
    for (_, m), img in zip(first.iterrows(), null):
        png = next(s["png"] for s in iter_shard(f"{r.uri}/{m['shard']}") if s["__key__"] == m["key"])
        assert np.abs(decode_png(png).astype(int) - img.numpy().astype(int)).max() <= 1  # other batch, same image
    again = generate(spec(tiny_conditional_model_uri, total=12, shard_size=5, unconditional=True), str(tmp_path))
    assert again.existed and again.uri == r.uri
    plain = generate(spec(tiny_conditional_model_uri, total=12, shard_size=5), str(tmp_path))
    assert plain.uri != r.uri  # a different cohort identity


@pytest.mark.parametrize("kw, fixture, message", [
    ({"per_class": 2}, "tiny_conditional_model_uri", "give --total N"),
    ({"total": 4, "ratios": "0=1"}, "tiny_conditional_model_uri", "give --total N"),
    ({"total": 4, "guidance": 3.0}, "tiny_conditional_model_uri", "nothing to guide"),
    ({"total": 4}, "tiny_per_class_model_uri", "it is per-class"),
    ({"total": 4, "sampler": "rflow"}, "tiny_rflow_model_uri", "label_dropout 0.0"),
])
def test_unconditional_refused_where_it_cannot_apply(kw, fixture, message, request, tmp_path):
    with pytest.raises(MeddiffError, match=message):
        generate(spec(request.getfixturevalue(fixture), unconditional=True, **kw), str(tmp_path))
    assert not (tmp_path / "cohorts").exists() or not any((tmp_path / "cohorts").iterdir())


def test_default_steps_follow_the_sampler(tiny_conditional_model_uri, tiny_rflow_model_uri, tmp_path):
    """No --steps: each sampler's measured default (bench_samplers: DDIM needs ~50, ancestral ~100)."""
    from meddiff.generate import plan_cohort

    for uri, sampler, want in ((tiny_conditional_model_uri, "auto", ("dpmpp2m", 25)),  # v-prediction (default)
                               (tiny_conditional_model_uri, "ddim", ("ddim", 50)),
                               (tiny_conditional_model_uri, "ddpm", ("ddpm", 100)),
                               (tiny_rflow_model_uri, "auto", ("heun", 25))):
        plan = plan_cohort(CohortSpec(uri, per_class=1, sampler=sampler, device="cpu"), str(tmp_path))
        assert (plan.spec.sampler, plan.spec.steps) == want and plan.ident["steps"] == want[1]
    model = load_model(tiny_conditional_model_uri, "cpu")  # the same network read as an ε model: auto = DDIM
    eps = dataclasses.replace(model, scheduler_config={**model.scheduler_config, "prediction_type": "epsilon"})
    assert resolve_sampler(CohortSpec(tiny_conditional_model_uri, per_class=1), eps).sampler == "ddim"
    plan = plan_cohort(CohortSpec(tiny_conditional_model_uri, per_class=1, steps=7, device="cpu"), str(tmp_path))
    assert plan.spec.steps == 7
