"""Ingest on the real MedMNIST / Kaggle-layout files: counts, determinism, bad input, resume."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddiff.errors import SourceError, StorageError, UnsafeArchiveError
from meddiff.data.ingest import IngestConfig, ingest
from meddiff.data.pixel_survey import ingest_notes, pixel_summary  # what `meddiff datasets show` prints
from meddiff.data.shards import iter_shard, open_dataset


def npz_counts(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {s: np.bincount(z[f"{s}_labels"].reshape(-1), minlength=8) for s in ("train", "val", "test")}


def test_bloodmnist_exact_counts(bloodmnist_uri, medmnist_dir):
    ds = open_dataset(bloodmnist_uri)
    card = ds.card
    assert card["totals"] == {"train": 11959, "val": 1712, "test": 3421}
    expected = npz_counts(medmnist_dir / "bloodmnist.npz")
    for split in ("train", "val", "test"):
        assert [card["counts"][split][c] for c in ds.class_names] == expected[split].tolist()
    assert card["channels"] == 3 and card["image_size"] == 28 and card["license"] == "CC BY 4.0"
    assert card["inputs"]["source_checksums"] == {"bloodmnist.npz": "md5:7053d0359d879ad8a5505303e11de1dc"}
    idx = ds.index()
    assert len(idx) == 17092 and not idx.key.str.contains(r"\.").any() and idx.key.is_unique
    assert set(idx.columns) >= {"key", "split", "label", "label_name", "shard", "source_id", "height",
                                "width", "channels", "sha256"}
    # the shards hold exactly the index's images, bit for bit, and the same pixels as the npz
    # (issue 16: splits are written in a seeded random order, so val-000000 is the npz image its source_id names)
    row = idx[idx.key == "val-000000"].iloc[0]
    with np.load(medmnist_dir / "bloodmnist.npz") as z:
        npz_val = z["val_images"][int(row.source_id.rsplit("/", 1)[1])]
    images, labels = ds.load_split("val")
    assert images.shape == (1712, 3, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images[0].transpose(1, 2, 0), npz_val)
    val = idx[idx.split == "val"]
    assert val.source_id.tolist() != sorted(val.source_id, key=lambda s: int(s.rsplit("/", 1)[1]))  # not npz order
    assert card["order"] == {"shuffled": True, "shuffle_seed": 0, "note": card["order"]["note"]}
    sample = next(iter_shard(ds.shard_uris("val")[0]))
    assert hashlib.sha256(sample["png"]).hexdigest() == row.sha256
    assert labels[0] == row.label


def test_breastmnist_stays_single_channel(breastmnist_uri):
    ds = open_dataset(breastmnist_uri)
    assert ds.card["totals"] == {"train": 546, "val": 78, "test": 156}
    assert ds.card["counts"]["train"] == {"malignant": 147, "normal, benign": 399}
    images, _ = ds.load_split("test")
    assert images.shape == (156, 1, 28, 28)
    img, label = next(iter(ds.pipeline("train")))
    assert tuple(img.shape) == (1, 28, 28) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_leukemia_zip(leukemia_zip, tmp_path):
    r = ingest(IngestConfig(f"zip:{leukemia_zip}", size=32), str(tmp_path))
    card = r.card
    assert card["class_names"] == ["Benign", "Early", "Pre", "Pro"]
    # 17 of the 100 Pro smears are byte-identical copies of another Pro file: kept once, so that no test
    # image is a copy of a train image (10 of the 17 pairs were split apart, 8 of them test/train)
    assert card["totals"] == {"train": 268, "val": 38, "test": 77}
    assert card["counts"]["test"] == {"Benign": 20, "Early": 20, "Pre": 20, "Pro": 17}
    assert card["num_skipped"] == 17 and card["channels"] == 3
    assert all(s["source_id"].startswith("Original/Pro/") and s["reason"].startswith("exact duplicate of Original/Pro/")
               for s in card["skipped"])
    assert card["duplicates"] == {"identical_groups": 0, "across_splits": 0, "dropped_copies": 17,
                                  "rule": card["duplicates"]["rule"]}
    index = open_dataset(r.uri).index()
    assert index["sha256"].is_unique
    images, _ = open_dataset(r.uri).load_split("val")
    assert images.shape == (38, 3, 32, 32)


def test_a_class_with_no_val_images_is_warned_about(leukemia_zip, tmp_path):
    """4 Benign smears: 3 train, 0 val, 1 test at the default fractions. The counts table showed the 0 and
    nothing else; evaluation then had no real baseline for Benign. ingest and datasets show now say so."""
    from typer.testing import CliRunner

    from meddiff.cli import app
    from meddiff.data.shards import empty_splits

    with zipfile.ZipFile(leukemia_zip) as z:
        z.extractall(tmp_path / "src")
    for png in sorted((tmp_path / "src" / "Original" / "Benign").iterdir())[4:]:
        png.unlink()
    runner = CliRunner()
    out = runner.invoke(app, ["ingest", f"folder:{tmp_path / 'src' / 'Original'}", "--size", "16",
                              "--storage", str(tmp_path / "root")], terminal_width=400)
    assert out.exit_code == 0, out.output
    uri = out.output.strip().splitlines()[-1]
    card = open_dataset(uri).card
    assert card["counts"]["val"]["Benign"] == 0 and card["counts"]["test"]["Benign"] == 1
    assert empty_splits(card) == ["no val images of Benign: evaluation has no real baseline for them: their "
                                  "synthetic images are left out of the overall set metrics and their class is not "
                                  "judged (a larger --val-frac, or more images of them)"]
    shown = runner.invoke(app, ["datasets", "show", uri], terminal_width=400)
    for said in (out.output, shown.output):
        assert f"warning: {empty_splits(card)[0]}" in " ".join(said.split()), said  # rich wraps at 80
    full = ingest(IngestConfig(f"zip:{leukemia_zip}", size=16), str(tmp_path / "root"))
    assert empty_splits(full.card) == []  # every class in every split
    no_val = ingest(IngestConfig(f"zip:{leukemia_zip}", size=16, val_frac=0.0), str(tmp_path / "root"))
    assert empty_splits(no_val.card) == []  # a split left empty on purpose is no gap


def test_archive_files_are_read_when_needed_not_held(leukemia_zip):
    """A zip's members are read one at a time (a 787 MB archive no longer sits in memory: peak RSS 1351 →
    601 MB, bench figure in the commit), and each read gives the member's bytes."""
    import zipfile

    from meddiff.data.sources.archive_source import load_zip

    src = load_zip(leukemia_zip, None, "leukemia-sample")
    assert len(src.samples) == 383 and all(callable(s.payload) for s in src.samples)
    with zipfile.ZipFile(leukemia_zip) as z:
        for s in src.samples[::50]:
            assert s.data() == z.read(s.source_id)


def test_official_splits_are_kept_and_their_copies_counted(medmnist_dir, tmp_path):
    """BreastMNIST as published holds one image in both train and test (with different labels): the
    official splits stay as they are, and the card says so."""
    r = ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)), str(tmp_path))
    assert r.card["totals"] == {"train": 546, "val": 78, "test": 156}
    assert {k: v for k, v in r.card["duplicates"].items() if k != "rule"} == \
        {"identical_groups": 1, "across_splits": 1, "dropped_copies": 0}
    index = open_dataset(r.uri).index()
    copies = index[index["sha256"].duplicated(keep=False)]
    assert sorted(copies["split"]) == ["test", "train"] and copies["label"].nunique() == 2
    from typer.testing import CliRunner

    from meddiff.cli import app

    shown = CliRunner().invoke(app, ["datasets", "show", r.uri], env={"COLUMNS": "200"})
    assert "duplicates: 1 image(s) stored identically in two splits" in shown.output


def test_classes_select_and_rename(leukemia_zip, tmp_path):
    r = ingest(IngestConfig(f"zip:{leukemia_zip}", size=16, classes="Original/Benign=benign,Original/Pro=pro"),
               str(tmp_path))
    assert r.card["class_names"] == ["benign", "pro"]
    assert sum(r.card["totals"].values()) == 183  # 100 benign + 100 pro, 17 pro copies kept once


def test_deterministic_and_idempotent(medmnist_dir, tmp_path):
    cfg = IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir), shard_size=200)
    a, b = ingest(cfg, str(tmp_path / "a")), ingest(cfg, str(tmp_path / "b"))
    assert Path(a.uri).name == Path(b.uri).name  # same content hash version
    files = sorted(p.name for p in Path(a.uri).iterdir() if p.suffix in (".tar", ".parquet"))
    assert len([f for f in files if f.startswith("train-")]) == 3  # 546 samples / 200 per shard
    for f in files:
        assert (Path(a.uri) / f).read_bytes() == (Path(b.uri) / f).read_bytes(), f
    again = ingest(cfg, str(tmp_path / "a"))
    assert again.existed and again.uri == a.uri


def _folder_with_problems(root: Path) -> Path:
    src = root / "src"
    rng = np.random.default_rng(0)
    for cls in ("alpha", "beta"):
        (src / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(src / cls / f"{i}.png")
    good = (src / "alpha" / "0.png").read_bytes()
    (src / "alpha" / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "beta" / "garbage.jpg").write_bytes(b"not an image at all")
    (src / "beta" / "notes.txt").write_text("clinical notes")
    return src


def test_bad_images_are_skipped_and_listed(tmp_path):
    src = _folder_with_problems(tmp_path)
    r = ingest(IngestConfig(f"folder:{src}", size=16), str(tmp_path / "st"))
    skipped = {s["source_id"]: s["reason"] for s in r.card["skipped"]}
    assert set(skipped) == {"alpha/truncated.png", "beta/garbage.jpg", "beta/notes.txt"}
    assert "not an image file" in skipped["beta/notes.txt"]
    assert "unreadable" in skipped["alpha/truncated.png"]
    assert sum(r.card["totals"].values()) == 12


def test_empty_class_folder_is_an_error(tmp_path):
    src = _folder_with_problems(tmp_path)
    (src / "gamma").mkdir()
    with pytest.raises(SourceError, match="gamma"):
        ingest(IngestConfig(f"folder:{src}", size=16), str(tmp_path / "st"))


def test_zip_slip_is_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("cls/ok.png", buf.getvalue())
        z.writestr("../../escaped.png", buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="escapes"):
        ingest(IngestConfig(f"zip:{evil}", size=8), str(tmp_path / "st"))
    assert not list(tmp_path.parent.glob("escaped.png")) and not (tmp_path / "st" / "datasets").exists()


@pytest.mark.parametrize("source,size,match", [
    ("medmnist:nosuchmnist", None, "unknown MedMNIST flag"),
    ("medmnist:bloodmnist", 100, "size must be one of"),
    ("medmnist:organmnist3d", None, "3D"),
    ("tiff:/x", None, "unknown source"),
])
def test_bad_source_names(source, size, match, medmnist_dir, tmp_path):
    with pytest.raises(SourceError, match=match):
        ingest(IngestConfig(source, size=size, medmnist_root=str(medmnist_dir)), str(tmp_path))


def test_md5_mismatch_and_missing_file(medmnist_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray((medmnist_dir / "breastmnist.npz").read_bytes())
    data[1000] ^= 0xFF
    (bad / "breastmnist.npz").write_bytes(bytes(data))
    with pytest.raises(SourceError, match="md5 mismatch"):
        ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(bad)), str(tmp_path / "st"))
    with pytest.raises(SourceError, match="bloodmnist.npz not found in --medmnist-root"):
        ingest(IngestConfig("medmnist:bloodmnist", medmnist_root=str(bad)), str(tmp_path / "st"))


def test_unwritable_storage_root(medmnist_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)), str(blocker / "storage"))


def test_kaggle_without_credentials_says_how(tmp_path, monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nokaggle"))
    with pytest.raises(SourceError, match="KAGGLE_USERNAME and KAGGLE_KEY"):
        ingest(IngestConfig("kaggle:mehradaria/leukemia"), str(tmp_path / "st"))


class _InterruptedOnceKaggle:
    """Stands in for kaggle's KaggleApi: the first download writes half the zip where it was told to and
    is interrupted (Ctrl-C), the next one resumes it there, as the kaggle package does."""

    calls: list[str] = []

    def __init__(self, archive: Path):
        self.archive = archive

    def authenticate(self) -> None:
        pass

    def dataset_download_files(self, ref, path, unzip, quiet):
        out = Path(path) / (ref.split("/")[1] + ".zip")
        data = self.archive.read_bytes()
        _InterruptedOnceKaggle.calls.append(path)
        if len(_InterruptedOnceKaggle.calls) == 1:
            out.write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        out.write_bytes(data)


def _use_fake_kaggle(monkeypatch, make_api) -> None:
    """The kaggle package replaced by a module whose KaggleApi is ``make_api()``, with credentials set."""
    import types

    fake = types.ModuleType("kaggle.api.kaggle_api_extended")
    fake.KaggleApi = make_api
    for name in ("kaggle", "kaggle.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", fake)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-key")


def test_interrupted_kaggle_download_is_resumed_not_read_as_the_dataset(leukemia_zip, tmp_path, monkeypatch):
    _use_fake_kaggle(monkeypatch, lambda: _InterruptedOnceKaggle(leukemia_zip))
    _InterruptedOnceKaggle.calls.clear()
    root = tmp_path / "st"
    with pytest.raises(KeyboardInterrupt):
        ingest(IngestConfig("kaggle:owner/leukemia-sample", size=16), str(root))
    raw = root / "raw" / "kaggle" / "owner" / "leukemia-sample"
    assert not (raw / "leukemia-sample.zip").exists()  # the half zip is not where the dataset is read from
    r = ingest(IngestConfig("kaggle:owner/leukemia-sample", size=16), str(root))
    assert len(_InterruptedOnceKaggle.calls) == 2 and sum(r.card["totals"].values()) == 383
    assert sorted(p.name for p in raw.iterdir()) == ["leukemia-sample.zip"]
    # a half zip left in place by an older meddiff is fetched again, not read
    data = (raw / "leukemia-sample.zip").read_bytes()
    (raw / "leukemia-sample.zip").write_bytes(data[:1000])
    shutil.rmtree(Path(r.uri))
    again = ingest(IngestConfig("kaggle:owner/leukemia-sample", size=16), str(root))
    assert len(_InterruptedOnceKaggle.calls) == 3 and again.uri == r.uri


def test_sigkill_mid_ingest_leaves_nothing_complete_then_resumes(medmnist_dir, tmp_path):
    root = tmp_path / "st"
    cmd = [sys.executable, "-m", "meddiff", "ingest", "medmnist:bloodmnist", "--shard-size", "2000",
           "--medmnist-root", str(medmnist_dir), "--storage", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((root / ".staging").glob("*/train-000001.tar")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((root / ".staging").glob("*/train-000001.tar")), "ingest never reached its second shard"
    assert not list((root / "datasets").glob("*/*/dataset.json"))  # nothing looks complete
    r = ingest(IngestConfig("medmnist:bloodmnist", shard_size=2000, medmnist_root=str(medmnist_dir)), str(root))
    assert not r.existed and r.card["totals"]["train"] == 11959
    assert len(open_dataset(r.uri).shard_uris("train")) == 6


def test_cli_ingest_and_list(medmnist_dir, tmp_path):
    from typer.testing import CliRunner

    from meddiff.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["ingest", "medmnist:breastmnist", "--medmnist-root", str(medmnist_dir),
                              "--storage", str(tmp_path)])
    assert res.exit_code == 0, res.output
    uri = res.output.strip().splitlines()[-1]
    assert open_dataset(uri).card["name"] == "breastmnist"
    res = runner.invoke(app, ["datasets", "list", "--storage", str(tmp_path)])
    assert res.exit_code == 0 and "breastmnist" in res.output
    res = runner.invoke(app, ["ingest", "medmnist:breastmnist", "--medmnist-root", str(medmnist_dir),
                              "--storage", str(tmp_path)])
    assert "already exists" in res.output


def test_s3_round_trip(medmnist_dir, breastmnist_uri, moto_s3):
    r = ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)), "s3://meddiff/prod")
    assert r.uri.startswith("s3://meddiff/prod/datasets/breastmnist/")
    remote, local = open_dataset(r.uri), open_dataset(breastmnist_uri)
    assert remote.card["counts"] == local.card["counts"] and remote.version == local.version
    xr, yr = remote.load_split("train")
    xl, yl = local.load_split("train")
    assert np.array_equal(xr, xl) and np.array_equal(yr, yl)
    assert len(list(remote.pipeline("val"))) == 78
    assert ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)), "s3://meddiff/prod").existed


def test_ingest_flow_on_ephemeral_server(prefect_harness, medmnist_dir, tmp_path):
    from flows.ingest_dataset import ingest_dataset

    uri = ingest_dataset(source="medmnist:breastmnist", medmnist_root=str(medmnist_dir), storage_root=str(tmp_path))
    assert open_dataset(uri).card["totals"]["train"] == 546


def _breast_folder(root: Path, medmnist_dir: Path, scale: float | None) -> Path:
    """40 real BreastMNIST training images in class folders: 8-bit PNGs, or 16-bit PNGs of round(v · scale)."""
    with np.load(medmnist_dir / "breastmnist.npz") as z:
        x, y = z["train_images"][:40], z["train_labels"][:40, 0]
    for i, (img, label) in enumerate(zip(x, y)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        arr = img if scale is None else np.rint(img.astype(np.float64) * scale).astype(np.uint16)
        Image.fromarray(arr).save(root / f"c{label}" / f"{i:02d}.png")
    return root


def test_dataset_names_are_one_safe_folder(medmnist_dir, tmp_path, monkeypatch):
    """`folder:.` once named its dataset '' and wrote it to datasets/<version>/, outside the layout; a
    derived name becomes a safe folder name, and a bad --name is refused before anything is read."""
    src = _breast_folder(tmp_path / "my scans (2)", medmnist_dir, None)
    root = tmp_path / "st"
    monkeypatch.chdir(src)
    here = ingest(IngestConfig("folder:.", size=28), str(root))
    assert here.card["name"] == "my-scans-2"
    assert Path(here.uri).parent == root / "datasets" / "my-scans-2"
    for bad in ("../escape", "a/b", "", "-x", "x" * 65):
        with pytest.raises(SourceError, match="is not a usable name"):
            ingest(IngestConfig("folder:.", size=28, name=bad), str(root))
    assert [p.name for p in (root / "datasets").iterdir()] == ["my-scans-2"]
    assert not (root / "escape").exists()


@pytest.mark.parametrize("scale,bits", [(257.0, 16), (4095 / 255, 12)])
def test_16bit_png_ingests_to_the_8bit_pixels(medmnist_dir, tmp_path, scale, bits):
    eight = ingest(IngestConfig(f"folder:{_breast_folder(tmp_path / 'b8', medmnist_dir, None)}", size=28,
                                name="b"), str(tmp_path / "st"))
    deep_src = _breast_folder(tmp_path / "b16", medmnist_dir, scale)
    assert Image.open(next((deep_src / "c0").iterdir())).mode == "I;16"  # a real 16-bit PNG
    deep = ingest(IngestConfig(f"folder:{deep_src}", size=28, name="b"), str(tmp_path / "st"))
    assert deep.card["intensity"] == {"rule": "bit-depth", "bits": bits, "float": deep.card["intensity"]["float"]}
    assert pixel_summary(deep.card).startswith(f"deeper than 8 bits rescaled by bit depth ({bits} bits); 1 channel")
    assert eight.card["intensity"]["rule"].startswith("none")
    a, b = open_dataset(eight.uri), open_dataset(deep.uri)
    for split in ("train", "val", "test"):
        xa, ya = a.load_split(split)
        xb, yb = b.load_split(split)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # not clipped to white: Pillow's convert("L"), the old path, saturates these files
    first = next((deep_src / "c0").iterdir())
    assert (np.asarray(Image.open(first).convert("L")) == 255).mean() > 0.5
    assert (b.load_split("train")[0] == 255).mean() < 0.05


def test_percentile_window_and_explicit_bit_depth(medmnist_dir, tmp_path):
    src = _breast_folder(tmp_path / "b12", medmnist_dir, 4095 / 255)
    win = ingest(IngestConfig(f"folder:{src}", size=28, window="1,99"), str(tmp_path / "st"))
    assert win.card["intensity"] == {"rule": "percentile-window", "percentiles": [1.0, 99.0]}
    x, _ = open_dataset(win.uri).load_split("train")
    assert all(img.min() == 0 and img.max() == 255 for img in x)  # each image stretched to its own window
    as16 = ingest(IngestConfig(f"folder:{src}", size=28, bit_depth=16), str(tmp_path / "st"))
    assert as16.card["intensity"]["bits"] == 16 and as16.uri != win.uri
    x16, _ = open_dataset(as16.uri).load_split("train")
    assert x16.max() <= 4095 * 255 // 65535 + 1  # 12-bit data read as 16-bit: dark, as asked
    with pytest.raises(SourceError, match="--window"):
        IngestConfig(f"folder:{src}", window="99,1").check()


def test_float_images_in_unit_range_ingest_to_the_8bit_pixels(medmnist_dir, tmp_path):
    eight = ingest(IngestConfig(f"folder:{_breast_folder(tmp_path / 'b8', medmnist_dir, None)}", size=28, name="b"),
                   str(tmp_path / "st"))
    src = _breast_folder(tmp_path / "b8f", medmnist_dir, None)
    for p in list(src.rglob("*.png")):  # the same images as float32 TIFFs in [0, 1]
        Image.fromarray(np.asarray(Image.open(p), np.float32) / 255).save(p.with_suffix(".tif"))
        p.unlink()
    assert Image.open(next(src.rglob("*.tif"))).mode == "F"
    deep = ingest(IngestConfig(f"folder:{src}", size=28, name="b"), str(tmp_path / "st"))
    assert deep.card["intensity"]["rule"] == "bit-depth" and "[0, 1] × 255" in deep.card["intensity"]["float"]
    xa, _ = open_dataset(eight.uri).load_split("train")
    xb, _ = open_dataset(deep.uri).load_split("train")
    assert np.array_equal(xa, xb)


def test_ctrl_c_says_nothing_was_published(medmnist_dir, tmp_path):
    """Ctrl-C used to exit 130 without a word about what was kept."""
    root = tmp_path / "st"
    proc = subprocess.Popen([sys.executable, "-m", "meddiff", "ingest", "medmnist:bloodmnist", "--medmnist-root",
                             str(medmnist_dir), "--storage", str(root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((root / ".staging").glob("*")) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # writing shards into its staging folder
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err[-1000:]
    assert re.fullmatch(rf"interrupted: stopped before {re.escape(str(root))}/datasets/bloodmnist/\w+ was published "
                        r"\(its staging folder is removed\): re-run the same command to ingest it",
                        err.strip().splitlines()[-1]), err[-1000:]
    assert not list(root.glob("datasets/*/*/dataset.json")) and not list((root / ".staging").glob("*"))



def _twice_at_once(fn) -> list:
    """``fn()`` in two threads at once: what each returned, or the exception it raised."""
    import threading

    results: list = [None, None]

    def run(i: int) -> None:
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


class _SlowKaggle(_InterruptedOnceKaggle):
    """Stands in for kaggle's KaggleApi: writes the zip in 8 pieces, 50 ms apart, as a real download would."""

    calls: list[str] = []

    def dataset_download_files(self, ref, path, unzip, quiet):
        _SlowKaggle.calls.append(path)
        data = self.archive.read_bytes()
        step = len(data) // 8 + 1
        with open(Path(path) / (ref.split("/")[1] + ".zip"), "wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(0.05)


def test_concurrent_kaggle_downloads_of_one_dataset_download_it_once(leukemia_zip, tmp_path, monkeypatch):
    """Two ingests of the same Kaggle dataset at once (two flows on one worker) share raw/kaggle/<ref>/: the
    second waits for the first's download and reads the same whole zip, instead of writing into its folder."""
    from meddiff.data.sources import kaggle_source

    _use_fake_kaggle(monkeypatch, lambda: _SlowKaggle(leukemia_zip))
    _SlowKaggle.calls.clear()
    dest = tmp_path / "raw" / "kaggle" / "owner" / "leukemia-sample"
    results = _twice_at_once(lambda: kaggle_source.download("owner/leukemia-sample", dest))
    assert results == [dest / "leukemia-sample.zip"] * 2, results
    assert len(_SlowKaggle.calls) == 1
    assert (dest / "leukemia-sample.zip").read_bytes() == leukemia_zip.read_bytes()
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".locks")) == ["leukemia-sample.zip"]


def test_concurrent_medmnist_downloads_of_one_file_download_it_once(medmnist_dir, tmp_path, monkeypatch):
    """Two ingests of one MedMNIST file at once on a machine with internet share raw/medmnist/: the second
    waits for the first's download and md5-checks the same whole file, instead of writing into its .part."""
    import io
    import urllib.request

    from meddiff.data.sources import medmnist_source

    data = (medmnist_dir / "breastmnist.npz").read_bytes()
    calls: list[str] = []

    class SlowBody(io.BytesIO):
        def read(self, n=-1):
            time.sleep(0.02)
            return super().read(min(n, len(data) // 8 + 1) if n and n > 0 else -1)

        def __exit__(self, *exc):
            self.close()

    def urlopen(url, timeout=None):
        calls.append(url)
        return SlowBody(data)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    raw = tmp_path / "raw" / "medmnist"
    results = _twice_at_once(lambda: medmnist_source.fetch_npz("breastmnist", 28, None, raw)[0])
    assert results == [raw / "breastmnist.npz"] * 2, results
    assert len(calls) == 1
    assert (raw / "breastmnist.npz").read_bytes() == data


def test_concurrent_medmnist_ingests_wait_for_one_extraction_and_say_so(medmnist_dir, tmp_path, monkeypatch):
    """Two ingests of one MedMNIST file at once: one extracts its arrays (minutes at 224 px), the other waits
    and is told who it waits on and why; the wait used to be silent. Both then map the same arrays."""
    from meddiff.data.ingest import IngestConfig, load_source

    copy = shutil.copyfileobj

    def slow_copy(src, dst, length=0):
        time.sleep(0.5)  # an extraction that takes a while, so the second ingest finds the lock held
        copy(src, dst, length)

    monkeypatch.setattr(shutil, "copyfileobj", slow_copy)
    told: list[str] = []

    def progress(done: int, total: int) -> None:
        pass

    progress.tell = told.append  # type: ignore[attr-defined]
    cfg = IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)).resolved()
    results = _twice_at_once(lambda: load_source(cfg, str(tmp_path), progress))
    assert all(len(r.samples) == 780 for r in results), results
    assert len(told) == 1, told
    assert re.fullmatch(r"another process \(pid \d+ on .+, for \d+ s\) is downloading or unpacking "
                        r"medmnist:breastmnist \(size 28\): waiting for it to finish, then going on "
                        r"\(Ctrl-C stops waiting\)", told[0]), told


def test_medmnist_images_are_read_from_disk_not_held_in_memory(medmnist_dir, tmp_path):
    """A compressed npz split loaded with np.load sits whole in memory (16 GB for PathMNIST at 224 px): the
    source maps extracted arrays instead, so listing BloodMNIST's 17,092 images holds far less than their
    40 MiB, and every later ingest of the file reuses the extraction."""
    import tracemalloc

    from meddiff.data.sources import medmnist_source

    raw = tmp_path / "raw" / "medmnist"
    medmnist_source.load("bloodmnist", 28, medmnist_dir, raw)  # imports, and extracts the arrays
    arrays = sorted(raw.glob("extracted/bloodmnist-*/*.npy"))
    assert [p.name for p in arrays] == ["test_images.npy", "train_images.npy", "val_images.npy"]
    stamps = [p.stat().st_mtime_ns for p in arrays]
    tracemalloc.start()
    src = medmnist_source.load("bloodmnist", 28, medmnist_dir, raw)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    with np.load(medmnist_dir / "bloodmnist.npz") as npz:
        images = {split: npz[f"{split}_images"] for split in ("train", "val", "test")}
    nbytes = sum(a.nbytes for a in images.values())
    assert len(src.samples) == 17092 and nbytes > 40e6
    assert held < nbytes / 3, f"{held / 2**20:.0f} MiB held for {nbytes / 2**20:.0f} MiB of images"
    for s in src.samples[::997]:  # the same pixels, in the same order
        split, i = s.source_id.split("/")[1], int(s.source_id.split("/")[2])
        assert s.split == split and np.array_equal(s.payload, images[split][i])
    assert [p.stat().st_mtime_ns for p in arrays] == stamps  # the extraction is reused
    # a killed extraction leaves only its .part; a cut-short array (an older, unlocked run) is extracted again
    with open(arrays[0], "r+b") as f:
        f.truncate(1000)
    (arrays[0].parent / "val_images.npy.part").write_bytes(b"half")
    again = medmnist_source.load("bloodmnist", 28, medmnist_dir, raw)
    assert np.array_equal(again.samples[-1].payload, images["test"][-1])
    assert [p.stat().st_mtime_ns for p in arrays][1:] == stamps[1:]  # whole ones reused


def test_grey_images_stored_as_colour_ingest_as_grey(medmnist_dir, tmp_path):
    """Grey radiographs saved as RGB or palette files (common in Kaggle sets) made a 3-channel dataset of
    grey pixels: 3× the model input, and synthetic images free to drift in tint. They are grey now, pixel
    for pixel, and the card counts them; one image in colour keeps the dataset RGB, and says which."""
    root = str(tmp_path / "st")
    grey = ingest(IngestConfig(f"folder:{_breast_folder(tmp_path / 'g', medmnist_dir, None)}", size=28, name="b"), root)
    src = _breast_folder(tmp_path / "c", medmnist_dir, None)
    files = sorted(src.rglob("*.png"))
    for i, p in enumerate(files):  # half RGB, half 8-bit palette PNGs of the same pixels
        arr = np.asarray(Image.open(p))
        if i % 2:
            Image.fromarray(np.stack([arr] * 3, axis=2)).save(p)
        else:
            pal = Image.fromarray(arr, mode="P")
            pal.putpalette([v for i in range(256) for v in (i, i, i)])
            pal.save(p)
    assert {Image.open(p).mode for p in files} == {"RGB", "P"}
    stored = ingest(IngestConfig(f"folder:{src}", size=28, name="b"), root)
    assert stored.card["channels"] == 1 and stored.card["pixels"]["grey_stored_as_colour"] == 40

    assert pixel_summary(stored.card) == ("none: every input is 8-bit; 1 channel (40 colour-encoded files hold grey "
                                          "pixels)")
    assert ingest_notes(stored.card) == ["40 colour-encoded images hold grey pixels: read as grey (1 channel; "
                                         "--colour rgb keeps 3)"]
    windowed = ingest(IngestConfig(f"folder:{src}", size=28, name="b", window="1,99"), root).card
    assert ingest_notes(windowed)[1] == ("--window 1,99 not applied (only inputs deeper than 8 bits are rescaled; "
                                         "every input is 8-bit)")
    for split in ("train", "val", "test"):
        xa, ya = open_dataset(grey.uri).load_split(split)
        xb, yb = open_dataset(stored.uri).load_split(split)
        assert xb.shape[1] == 1 and np.array_equal(xa, xb) and np.array_equal(ya, yb)
    as_rgb = ingest(IngestConfig(f"folder:{src}", size=28, name="b", colour="rgb"), root)
    x3, _ = open_dataset(as_rgb.uri).load_split("train")
    assert as_rgb.card["channels"] == 3 and x3.shape[1] == 3 and as_rgb.uri != stored.uri

    arr = np.asarray(Image.open(files[1])).copy()
    arr[:4, :4, 0] = 255  # a red mark: this one holds colour
    Image.fromarray(arr).save(files[1])
    tinted = ingest(IngestConfig(f"folder:{src}", size=28, name="b"), root)
    assert tinted.card["channels"] == 3 and tinted.card["pixels"]["first_colour_image"].endswith(files[1].name)
    forced = ingest(IngestConfig(f"folder:{src}", size=28, name="b", colour="grey"), root)
    assert forced.card["channels"] == 1 and forced.card["pixels"]["colour"] == "grey"
    assert "first_colour_image" not in forced.card["pixels"]
    for bad, match in (("medmnist:breastmnist", "published channels"), (f"folder:{src}", "must be one of")):
        with pytest.raises(SourceError, match=match):
            IngestConfig(bad, colour="grey" if bad.startswith("med") else "gray").check()


def test_transparent_pixels_are_counted_and_said(medmnist_dir, tmp_path):
    """Reading drops alpha (a transparent pixel keeps its stored colour, often black) and nothing said so.
    Opaque RGBA files read exactly as their grey originals; files with transparent pixels are counted on
    the card and named in the notes the command prints."""
    root = str(tmp_path / "st")
    grey = ingest(IngestConfig(f"folder:{_breast_folder(tmp_path / 'g', medmnist_dir, None)}", size=28, name="b"), root)
    src = _breast_folder(tmp_path / "a", medmnist_dir, None)
    files = sorted(src.rglob("*.png"))
    for p in files:  # opaque RGBA
        arr = np.asarray(Image.open(p))
        Image.fromarray(np.stack([arr, arr, arr, np.full_like(arr, 255)], axis=2), mode="RGBA").save(p)
    opaque = ingest(IngestConfig(f"folder:{src}", size=28, name="b"), root)
    assert opaque.card["pixels"]["transparent_images"] == 0 and opaque.card["channels"] == 1
    train = open_dataset(grey.uri).load_split("train")[0]
    assert np.array_equal(train, open_dataset(opaque.uri).load_split("train")[0])
    for p in files[:3]:
        rgba = np.asarray(Image.open(p)).copy()
        rgba[:5, :5, 3] = 0  # a transparent corner
        Image.fromarray(rgba, mode="RGBA").save(p)
    cut = ingest(IngestConfig(f"folder:{src}", size=28, name="b"), root).card
    assert cut["pixels"]["transparent_images"] == 3
    assert ingest_notes(cut)[0].startswith("3 images have transparent pixels: alpha is dropped")
    assert pixel_summary(cut).endswith("; 3 images with transparent pixels (alpha dropped)")


def test_exif_orientation_is_applied(medmnist_dir, tmp_path):
    """A camera stores a portrait shot as landscape pixels plus an EXIF orientation that viewers apply;
    ingest ignored it, so such images trained sideways. They are read upright now, and counted."""
    root = str(tmp_path / "st")
    upright = ingest(IngestConfig(f"folder:{_breast_folder(tmp_path / 'u', medmnist_dir, None)}", size=28, name="b"),
                     root)
    src = _breast_folder(tmp_path / "r", medmnist_dir, None)
    for p in sorted(src.rglob("*.png"))[::2]:  # every other file stored turned left, tagged "rotate 90° CW to view"
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.rot90(np.asarray(Image.open(p)))).save(p, exif=exif)
    turned = ingest(IngestConfig(f"folder:{src}", size=28, name="b"), root)
    assert turned.card["pixels"]["exif_rotated_images"] == 20
    for split in ("train", "val", "test"):
        xa, xb = open_dataset(upright.uri).load_split(split)[0], open_dataset(turned.uri).load_split(split)[0]
        assert np.array_equal(xa, xb)
    assert "20 images turned upright by their EXIF orientation" in pixel_summary(turned.card)
    assert ingest_notes(turned.card)[0].startswith("20 images turned upright")


def test_multi_page_tiffs_are_counted_and_said(medmnist_dir, tmp_path):
    """A TIFF stack's first page was read without a word about the others."""
    root = str(tmp_path / "st")
    flat = ingest(IngestConfig(f"folder:{_breast_folder(tmp_path / 'f', medmnist_dir, None)}", size=28, name="b"), root)
    src = _breast_folder(tmp_path / "t", medmnist_dir, None)
    pngs = sorted(src.rglob("*.png"))
    for p in pngs:  # the image, then a second page (its negative)
        im = Image.open(p)
        im.save(p.with_suffix(".tif"), save_all=True, append_images=[Image.eval(im, lambda v: 255 - v)])
        p.unlink()
    assert Image.open(next(src.rglob("*.tif"))).n_frames == 2
    stack = ingest(IngestConfig(f"folder:{src}", size=28, name="b"), root)
    assert stack.card["pixels"]["multi_frame_images"] == 40
    assert np.array_equal(open_dataset(flat.uri).load_split("train")[0], open_dataset(stack.uri).load_split("train")[0])
    assert ingest_notes(stack.card)[0].startswith("40 files hold several pages or frames")
    assert ingest_notes(stack.card)[0].endswith("--frames all reads every frame as an image")
    # --frames all: both pages are images (the second the negative of the first), each file's pages in one split
    pages = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28, name="b", frames="all"), root).uri)
    index = pages.index()
    assert len(index) == 80 and pages.card["pixels"]["frame_images"] == 80
    assert (index.groupby(index["source_id"].str.rpartition("#")[0])["split"].nunique() == 1).all()
    x = {sid: img for split in ("train", "val", "test")
         for sid, img in zip(index[index.split == split].sort_values("key").source_id, pages.load_split(split)[0])}
    some = next(iter(x)).rpartition("#")[0]
    assert np.array_equal(x[f"{some}#1"].astype(int), 255 - x[f"{some}#0"].astype(int))
    assert pages.card["splits"]["groups"] == {"rule": "grouped by file (--frames all): each group's images in one "
                                                       "split", "groups": 40, "images_without_group": 0}


def _split_folder_layout(medmnist_dir: Path, root: Path, splits: dict[str, int], names=("train", "test", "val")) -> Path:
    """Real BreastMNIST images in a Kaggle-style layout: <root>/chest_xray/<split folder>/<CLASS>/<i>.png, the
    first ``splits[split]`` images of each class from that official split."""
    with np.load(medmnist_dir / "breastmnist.npz") as z:
        for (split, n), folder in zip(splits.items(), names):
            x, y = z[f"{split}_images"], z[f"{split}_labels"][:, 0]
            for label, cls in ((0, "MALIGNANT"), (1, "NORMAL")):
                d = root / "chest_xray" / folder / cls
                d.mkdir(parents=True)
                for i in np.flatnonzero(y == label)[:n]:
                    Image.fromarray(x[i]).save(d / f"{split}{i}.png")
    return root


def test_published_split_folders_are_kept(medmnist_dir, tmp_path):
    """chest_xray/{train,test}/{MALIGNANT,NORMAL}: ingest refused it ("class name 'MALIGNANT' comes from several
    folders"), and the way round it (--classes globs) pooled and re-split the images, putting published test
    images (often other patients) in train. Now the folders' splits are kept, the missing val is carved from
    train, and the card and `datasets show` say so; --splits random pools them."""
    from meddiff.data.shards import split_note, split_summary

    src = _split_folder_layout(medmnist_dir, tmp_path / "src", {"train": 30, "test": 10})
    ds = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28), str(tmp_path / "st")).uri)
    index = ds.index()
    assert ds.class_names == ["MALIGNANT", "NORMAL"]
    folder_split = index["source_id"].str.split("/").str[1]
    assert (folder_split[index["split"] == "test"] == "test").all() and (folder_split == "test").sum() == 20
    assert (folder_split[index["split"].isin(["train", "val"])] == "train").all()
    assert ds.card["totals"] == {"train": 54, "val": 6, "test": 20}  # val: 10% of each class's 30 train images
    assert ds.card["official_splits"] is False and ds.card["splits"]["folders"]["test"] == [
        "chest_xray/test/MALIGNANT", "chest_xray/test/NORMAL"]
    assert split_summary(ds.card) == (
        "published split folders kept (train: chest_xray/train/MALIGNANT, chest_xray/train/NORMAL; test: "
        "chest_xray/test/MALIGNANT, chest_xray/test/NORMAL); val: --val-frac 0.1 of each class's train images "
        "(--split-seed 0); --splits random pools and re-splits them")
    assert split_note(ds.card) == "splits: " + split_summary(ds.card)  # what ingest prints

    # --classes keeping one split's folders (what the old error suggested): a split of those images, as before
    one = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28, classes="chest_xray/test/*"),
                              str(tmp_path / "st")).uri)
    assert one.card["totals"] == {"train": 14, "val": 2, "test": 4} and "folders" not in one.card["splits"]
    pooled = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28, splits="random"), str(tmp_path / "st")).uri)
    assert pooled.uri != ds.uri and pooled.card["totals"] == {"train": 56, "val": 8, "test": 16}
    assert (pooled.index()["source_id"].str.split("/").str[1][pooled.index()["split"] == "test"] == "train").any()
    assert split_summary(pooled.card).startswith("stratified per class: --val-frac 0.1, --test-frac 0.2, "
                                                 "--split-seed 0, the published split folders pooled")


def test_three_published_split_folders_are_kept_as_they_are(medmnist_dir, tmp_path):
    """Training/Validation/Testing (capitalised, as several Kaggle sets name them), zipped: every image keeps
    its folder's split, none is carved; the zip's 'README.md' beside them changes nothing."""
    src = _split_folder_layout(medmnist_dir, tmp_path / "src", {"train": 20, "val": 4, "test": 6},
                               names=("Training", "Validation", "Testing"))
    (src / "chest_xray" / "README.md").write_text("from Kaggle\n")
    with zipfile.ZipFile(tmp_path / "xray.zip", "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    ds = open_dataset(ingest(IngestConfig(f"zip:{tmp_path / 'xray.zip'}", size=28), str(tmp_path / "st")).uri)
    index = ds.index()
    expected = index["source_id"].str.split("/").str[1].map({"Training": "train", "Validation": "val",
                                                             "Testing": "test"})
    assert (index["split"] == expected).all() and ds.card["totals"] == {"train": 40, "val": 8, "test": 12}
    assert "carved" not in ds.card["splits"]
    with pytest.raises(SourceError, match="--splits applies to zip:, folder: and kaggle: sources"):
        IngestConfig("medmnist:breastmnist", splits="random").check()


def test_an_unlabelled_test_folder_is_skipped_not_made_a_class(medmnist_dir, tmp_path):
    """train/{MALIGNANT,NORMAL}/ beside a competition's unlabelled test/*.png: 'test' became a third class."""
    src = _split_folder_layout(medmnist_dir, tmp_path / "src", {"train": 10})
    for i in range(3):
        shutil.copy(next((src / "chest_xray" / "train" / "NORMAL").iterdir()), src / "chest_xray" / f"test{i}.png")
    (src / "chest_xray" / "test").mkdir()
    for i, f in enumerate(sorted((src / "chest_xray").glob("test*.png"))):
        f.rename(src / "chest_xray" / "test" / f"{i}.png")
    ds = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28), str(tmp_path / "st")).uri)
    assert ds.class_names == ["MALIGNANT", "NORMAL"] and sum(ds.card["totals"].values()) == 20
    assert [s["source_id"] for s in ds.card["skipped"]] == [f"chest_xray/test/{i}.png" for i in range(3)]
    assert ds.card["skipped"][0]["reason"].startswith("unlabelled: in split folder 'chest_xray/test'")
    assert "folders" not in ds.card["splits"]  # one labelled split: the usual stratified split of train's images


def _labelled_folder(medmnist_dir: Path, root: Path, n: int = 120, per_group: int = 3) -> Path:
    """HAM10000's layout: real BreastMNIST images in two part folders, labels and lesion ids in a CSV (a row for
    an image not shipped, one image without a row)."""
    import csv

    with np.load(medmnist_dir / "breastmnist.npz") as z:
        x, y = z["train_images"][:n], z["train_labels"][:n, 0]
    rows = []
    for i in range(n):
        part = root / f"images_part_{i % 2 + 1}"
        part.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(part / f"IMG_{i:04d}.png")
        if i != n - 1:  # the last image has no row
            rows.append({"lesion_id": f"L{i // per_group:03d}", "image_id": f"IMG_{i:04d}",
                         "dx": ("malignant", "normal")[y[i]]})
    rows.append({"lesion_id": "L999", "image_id": "IMG_9999", "dx": "normal"})  # not shipped
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["lesion_id", "image_id", "dx"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_labels_from_a_table_with_groups_kept_in_one_split(medmnist_dir, tmp_path):
    """Kaggle sets like HAM10000 label images in a CSV, not by folder: ingest could not read them at all. Now
    --labels reads it; --group-column keeps every lesion's images in one split (a random split put images of
    one lesion in train and test)."""
    from meddiff.data.shards import label_summary, split_summary

    src = _labelled_folder(medmnist_dir, tmp_path / "ham")
    cfg = IngestConfig(f"folder:{src}", size=28, labels="metadata.csv", id_column="image_id", label_column="dx",
                       group_column="lesion_id")
    ds = open_dataset(ingest(cfg, str(tmp_path / "st")).uri)
    index = ds.index()
    assert ds.class_names == ["malignant", "normal"] and len(index) == 119
    lesion = index["source_id"].str.extract(r"IMG_(\d+)")[0].astype(int) // 3
    assert (index.groupby(lesion)["split"].nunique() == 1).all()  # no lesion in two splits
    with np.load(medmnist_dir / "breastmnist.npz") as z:
        truth = z["train_labels"][:120, 0]
    stem = index["source_id"].str.extract(r"IMG_(\d+)")[0].astype(int)
    assert (index["label"].to_numpy() == truth[stem]).all()  # each image's label is its row's
    assert 0.15 <= (index["split"] == "test").mean() <= 0.25
    assert ds.card["skipped"] == [{"source_id": "images_part_2/IMG_0119.png", "reason": "no row in metadata.csv"}]
    assert label_summary(ds.card) == ("metadata.csv (image_id → dx); 1 of its 120 rows names no image in the "
                                      "source; 1 image has no row (skipped)")
    assert split_summary(ds.card).endswith("; grouped by column 'lesion_id': each group's images in one split "
                                           "(40 groups)")
    # the same table without groups: a plain stratified split, which here splits lesions apart
    plain = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28, labels="metadata.csv",
                                             id_column="image_id", label_column="dx"), str(tmp_path / "st")).uri)
    lesion = plain.index()["source_id"].str.extract(r"IMG_(\d+)")[0].astype(int) // 3
    assert (plain.index().groupby(lesion)["split"].nunique() > 1).any()

    # HAM10000's Kaggle zip ships its image folders twice (byte-identical): each row labels the copies and
    # one is kept; a file of the same name that differs is an error naming the way out
    shutil.copytree(src / "images_part_1", src / "copy_of_part_1")
    twice = open_dataset(ingest(cfg, str(tmp_path / "st2")).uri)
    assert len(twice.index()) == 119 and sum(s["reason"].startswith("exact duplicate of") for s in
                                             twice.card["skipped"]) == 60
    shutil.copy(src / "images_part_1" / "IMG_0000.png", src / "copy_of_part_1" / "IMG_0002.png")
    with pytest.raises(SourceError, match=r"label row 'IMG_0002' matches 2 different images .* give the path"):
        ingest(cfg, str(tmp_path / "st3"))


@pytest.mark.parametrize("change, message", [
    (dict(label_column="diagnosis"), r"metadata\.csv has no column --label-column 'diagnosis'; its columns are "
                                     r"\['lesion_id', 'image_id', 'dx'\]"),
    (dict(labels="meta.csv"), r"--labels 'meta\.csv' is neither a file inside .* nor on disk; tables inside: "
                              r"\['metadata\.csv'\]"),
    (dict(id_column="lesion_id"), r"image 'L001' is labelled both 'normal' and 'malignant' \(line 6\)"),
    (dict(labels=None), r"--id-column, --label-column and --group-column apply with --labels"),
])
def test_a_label_table_that_does_not_fit_is_one_clear_error(medmnist_dir, tmp_path, change, message):
    src = _labelled_folder(medmnist_dir, tmp_path / "ham", n=12)
    cfg = IngestConfig(f"folder:{src}", size=28, **{**dict(labels="metadata.csv", id_column="image_id",
                                                           label_column="dx"), **change})
    with pytest.raises(SourceError, match=message):
        ingest(cfg, str(tmp_path / "st"))
    assert not (tmp_path / "st" / "datasets").exists()


def test_grouped_split_never_splits_a_group():
    from meddiff.data.splits import grouped_split

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 2000).astype(str)
    labels = (rng.random(2000) < 0.3).astype(int)
    splits = grouped_split(labels, 5, 0.1, 0.2, groups)
    frame = __import__("pandas").DataFrame({"g": groups, "s": splits, "y": labels})
    assert (frame.groupby("g")["s"].nunique() == 1).all()
    for c in (0, 1):
        share = frame[frame.y == c]["s"].value_counts(normalize=True)
        assert abs(share["test"] - 0.2) < 0.05 and abs(share["val"] - 0.1) < 0.05


def test_one_hot_label_columns_as_isic_publishes_them(medmnist_dir, tmp_path):
    """ISIC's ground truth is one column per class holding 1.0 or 0.0 (and a class column nobody uses)."""
    import csv

    src = _labelled_folder(medmnist_dir, tmp_path / "isic", n=30)
    with open(src / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    with open(src / "truth.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "MAL", "NOR", "UNK"])
        for r in rows:
            hot = [float(r["dx"] == "malignant"), float(r["dx"] == "normal"), 0.0]
            writer.writerow([r["image_id"], *(f"{v:.1f}" for v in (hot if r["image_id"] != "IMG_0003" else
                                                                   (0, 0, 1)))])  # IMG_0003: another class
    ds = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28, labels="truth.csv", label_column="MAL,NOR"),
                             str(tmp_path / "st")).uri)
    with np.load(medmnist_dir / "breastmnist.npz") as z:
        truth = z["train_labels"][:30, 0]
    index = ds.index()
    stem = index["source_id"].str.extract(r"IMG_(\d+)")[0].astype(int)
    assert ds.class_names == ["MAL", "NOR"] and (index["label"].to_numpy() == truth[stem]).all()
    assert len(index) == 28  # the last image has no row, IMG_0003 is of another class
    assert {"source_id": "images_part_2/IMG_0003.png",
            "reason": "its row in truth.csv holds 1 in none of MAL,NOR"} in ds.card["skipped"]
    # a tab- or semicolon-separated table (a spreadsheet's export) reads the same
    for sep in ("\t", ";"):
        (src / "semi.csv").write_text((src / "metadata.csv").read_text().replace(",", sep))
        semi = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28, labels="semi.csv", id_column="image_id",
                                                label_column="dx"), str(tmp_path / "st")).uri)
        assert semi.class_names == ["malignant", "normal"] and sum(semi.card["totals"].values()) == 29
    # a label is the class as written: "a/b" is not read as a folder path (it became class "b")
    text = (src / "metadata.csv").read_text()
    (src / "odd.csv").write_text(text.replace(",malignant", ",malignant/confirmed").replace(",normal", ',"normal, ok"'))
    odd = open_dataset(ingest(IngestConfig(f"folder:{src}", size=28, labels="odd.csv", id_column="image_id",
                                           label_column="dx"), str(tmp_path / "st")).uri)
    assert odd.class_names == ["malignant/confirmed", "normal, ok"]
    with open(src / "truth.csv", "a", newline="") as f:
        f.write("IMG_0001,1.0,1.0,0.0\n")
    with pytest.raises(SourceError, match=r"line 32: 2 of the label columns hold 1 \(\['MAL', 'NOR'\]\)"):
        ingest(IngestConfig(f"folder:{src}", size=28, labels="truth.csv", label_column="MAL,NOR"), str(tmp_path / "st"))


def test_group_pattern_keeps_each_patients_images_in_one_split(medmnist_dir, tmp_path):
    """Kaggle's pneumonia X-rays are named person1_bacteria_1.jpeg, person1_bacteria_2.jpeg: a plain split puts one
    patient's images in train and test. --group-pattern 'person\\d+' keeps each patient in one split, also when
    a val split is carved from published train/ test/ folders."""
    from meddiff.data.shards import split_note

    with np.load(medmnist_dir / "breastmnist.npz") as z:
        x, y = z["train_images"][:151], z["train_labels"][:151, 0]
    for i in range(150):
        for root, split in ((tmp_path / "flat", ""), (tmp_path / "published", "train" if i < 120 else "test")):
            d = root / split / ("PNEUMONIA" if y[i] == 0 else "NORMAL")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(d / f"person{i // 4}_virus_{i % 4}.png")
    Image.fromarray(x[150]).save(tmp_path / "flat" / "NORMAL" / "IM-0001.png")  # no patient in its name

    def patients_split_apart(ds) -> int:
        index = ds.index()
        person = index["source_id"].str.extract(r"(person\d+)")[0]
        return int((index[person.notna()].groupby(person)["split"].nunique() > 1).sum())

    plain = open_dataset(ingest(IngestConfig(f"folder:{tmp_path / 'flat'}", size=28), str(tmp_path / "st")).uri)
    assert patients_split_apart(plain) > 0
    grouped = open_dataset(ingest(IngestConfig(f"folder:{tmp_path / 'flat'}", size=28, group_pattern=r"person\d+"),
                                  str(tmp_path / "st")).uri)
    assert patients_split_apart(grouped) == 0 and 0.15 <= (grouped.index()["split"] == "test").mean() <= 0.25
    assert split_note(grouped.card) == (
        "splits: stratified per class: --val-frac 0.1, --test-frac 0.2, --split-seed 0; grouped by pattern "
        "'person\\\\d+' on each file's path: each group's images in one split (39 groups; 1 image without "
        "one: a group of its own)")
    carved = open_dataset(ingest(IngestConfig(f"folder:{tmp_path / 'published'}", size=28, group_pattern=r"person\d+"),
                                 str(tmp_path / "st")).uri)
    assert patients_split_apart(carved) == 0 and carved.card["totals"]["val"] > 0
    # what the user reads: ingest and `datasets show` print the rule
    from typer.testing import CliRunner

    from meddiff.cli import app

    res = CliRunner().invoke(app, ["ingest", f"folder:{tmp_path / 'flat'}", "--size", "28", "--group-pattern",
                                   r"person\d+", "--storage", str(tmp_path / "st")], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and split_note(grouped.card) in res.output, res.output
    res = CliRunner().invoke(app, ["datasets", "show", grouped.uri], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and f"splits: {split_note(grouped.card)[8:]}" in res.output, res.output
    with pytest.raises(SourceError, match=r"--group-pattern 'person\(' is not a regular expression"):
        IngestConfig("folder:x", group_pattern="person(").check()
