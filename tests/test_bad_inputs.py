"""The bad-input catalogue: one table of bad inputs run through the CLI, the one-line message each gets, and
proof that nothing was half-written (no new complete artifact, no staging/temp debris).

Each row: (id, setup(tmp, fx) → CLI arguments, regex the one-line error must match). The CLI runs in-process
(typer's CliRunner) and its MeddiffError is rendered exactly as ``meddiff`` prints it (``error: <message>``,
exit status 2); one row also runs ``python -m meddiff`` as a subprocess to pin that rendering.
"""

from __future__ import annotations

import io
import json
import re
import os
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from meddiff.errors import MeddiffError

REPO = Path(__file__).resolve().parents[1]
RECORDS = {"dataset.json", "model.json", "cohort.json", "report.json"}


@dataclass
class Fx:
    """What the setups build on: real data, and lazily a real cohort / tiny model."""

    medmnist: Path
    leukemia: Path
    request: pytest.FixtureRequest

    def storage(self, tmp: Path) -> str:
        return str(tmp / "st")

    def breast_pngs(self, folder: Path, n: int = 12, classes=("benign", "malignant")) -> Path:
        with np.load(self.medmnist / "breastmnist.npz") as z:
            x = z["train_images"][: n * len(classes)]
        for k, c in enumerate(classes):
            (folder / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(x[k * n + i]).save(folder / c / f"{i:03d}.png")
        return folder

    def cohort(self, tmp: Path) -> Path:
        from cohort_factory import make_cohort
        from meddiff.data.shards import open_dataset

        ds_uri = self.request.getfixturevalue("breastmnist_uri")
        x, y = open_dataset(ds_uri).load_split("val")
        return Path(make_cohort(tmp / "st" / "cohorts" / "c", ds_uri, open_dataset(ds_uri).class_names,
                                x[:20], y[:20], shard_size=10))

    def model(self, tmp: Path) -> Path:
        src = Path(self.request.getfixturevalue("tiny_per_class_model_uri"))
        dest = tmp / "st" / "models" / src.name
        shutil.copytree(src, dest)
        return dest


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int = 40_000) -> bytes:
    """A tiny PNG whose header claims side × side pixels (Pillow refuses it as a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return path


def ingest_args(fx: Fx, tmp: Path, source: str, *extra: str) -> list[str]:
    return ["ingest", source, "--size", "16", "--storage", fx.storage(tmp), *extra]


# --- the setups: each builds a bad input under tmp and returns the CLI arguments -------------------------

def corrupt_npz(tmp, fx):
    (tmp / "mm").mkdir()
    (tmp / "mm" / "breastmnist.npz").write_bytes((fx.medmnist / "breastmnist.npz").read_bytes()[:5000])
    return ["ingest", "medmnist:breastmnist", "--medmnist-root", str(tmp / "mm"), "--storage", fx.storage(tmp)]


def wrong_md5_npz(tmp, fx):
    (tmp / "mm").mkdir()
    with np.load(fx.medmnist / "breastmnist.npz") as z:
        arrays = {k: z[k][:10] for k in z.files}  # a valid npz, but not the official file
    np.savez(tmp / "mm" / "breastmnist.npz", **arrays)
    return ["ingest", "medmnist:breastmnist", "--medmnist-root", str(tmp / "mm"), "--storage", fx.storage(tmp)]


def missing_npz(tmp, fx):
    (tmp / "mm").mkdir()
    return ["ingest", "medmnist:bloodmnist", "--medmnist-root", str(tmp / "mm"), "--storage", fx.storage(tmp)]


def truncated_zip(tmp, fx):
    data = fx.leukemia.read_bytes()
    (tmp / "t.zip").write_bytes(data[: len(data) // 2])
    return ingest_args(fx, tmp, f"zip:{tmp / 't.zip'}")


def damaged_zip_member(tmp, fx):
    z = _zip(tmp / "d.zip", {"a/1.png": _png() * 50, "b/1.png": _png((9, 9)) * 50})
    data = bytearray(z.read_bytes())
    data[60] ^= 0xFF  # inside the first member's compressed bytes: CRC check fails on read
    z.write_bytes(bytes(data))
    return ingest_args(fx, tmp, f"zip:{z}")


def zip_slip(tmp, fx):
    return ingest_args(fx, tmp, f"zip:{_zip(tmp / 's.zip', {'a/1.png': _png(), '../../evil.png': _png()})}")


def absolute_path_in_zip(tmp, fx):
    return ingest_args(fx, tmp, f"zip:{_zip(tmp / 'abs.zip', {'a/1.png': _png(), '/etc/evil.png': _png()})}")


def symlink_in_zip(tmp, fx):
    z = _zip(tmp / "l.zip", {"a/1.png": _png(), "b/1.png": _png((9, 9))}, symlinks={"b/2.png": "/etc/passwd"})
    return ingest_args(fx, tmp, f"zip:{z}")


def symlink_out_of_folder(tmp, fx):
    src = fx.breast_pngs(tmp / "src", n=3)
    (tmp / "secret.png").write_bytes(_png())
    os.symlink(tmp / "secret.png", src / "benign" / "link.png")
    return ingest_args(fx, tmp, f"folder:{src}")


def zip_bomb(tmp, fx):
    return ingest_args(fx, tmp, f"zip:{_zip(tmp / 'b.zip', {'a/1.png': _png(), 'b/1.png': bytes(4 << 20)})}")


def decompression_bomb(tmp, fx):
    src = fx.breast_pngs(tmp / "src", n=3)
    (src / "malignant" / "huge.png").write_bytes(_bomb_png())
    return ingest_args(fx, tmp, f"folder:{src}")


def non_image_files_only(tmp, fx):
    for c in ("a", "b"):
        (tmp / "src" / c).mkdir(parents=True)
        (tmp / "src" / c / "notes.txt").write_text("clinical notes")
    return ingest_args(fx, tmp, f"folder:{tmp / 'src'}")


def images_outside_class_folders(tmp, fx):
    (tmp / "src").mkdir()
    for i in range(3):
        (tmp / "src" / f"{i}.png").write_bytes(_png())
    return ingest_args(fx, tmp, f"folder:{tmp / 'src'}")


def single_class(tmp, fx):
    return ingest_args(fx, tmp, f"folder:{fx.breast_pngs(tmp / 'src', classes=('benign',))}")


def empty_folder(tmp, fx):
    (tmp / "src").mkdir()
    return ingest_args(fx, tmp, f"folder:{tmp / 'src'}")


def empty_class_folder(tmp, fx):
    src = fx.breast_pngs(tmp / "src", n=3)
    (src / "normal").mkdir()
    return ingest_args(fx, tmp, f"folder:{src}")


def same_file_in_two_classes(tmp, fx):
    src = fx.breast_pngs(tmp / "src", n=3)
    shutil.copy(src / "benign" / "001.png", src / "malignant" / "001.png")
    return ingest_args(fx, tmp, f"folder:{src}")


def same_folder_name_twice(tmp, fx):
    for top in ("2019", "2020"):
        fx.breast_pngs(tmp / "src" / top, n=2, classes=("benign", f"malignant{top}"))
    return ingest_args(fx, tmp, f"folder:{tmp / 'src'}")


def non_utf8_name(tmp, fx):
    src = fx.breast_pngs(tmp / "src", n=3)
    with open(os.fsencode(src / "benign") + b"/scan-\xff\xfe.png", "wb") as f:
        f.write(_png())
    return ingest_args(fx, tmp, f"folder:{src}")


def name_outside_the_layout(tmp, fx):
    return ingest_args(fx, tmp, f"folder:{fx.breast_pngs(tmp / 'src', n=3)}", "--name", "../escape")


def unknown_classes_glob(tmp, fx):
    return ingest_args(fx, tmp, f"zip:{fx.leukemia}", "--classes", "Original/Nosuch*")


def bad_window(tmp, fx):
    return ingest_args(fx, tmp, f"zip:{fx.leukemia}", "--window", "99,1")


def size_out_of_range(tmp, fx):
    return ["ingest", f"zip:{fx.leukemia}", "--size", "4", "--storage", fx.storage(tmp)]


def unknown_source_kind(tmp, fx):
    return ["ingest", "tiff:/data/scans", "--storage", fx.storage(tmp)]


def dataset_without_card(tmp, fx):
    ds = tmp / "st" / "datasets" / "x" / "v1"
    ds.mkdir(parents=True)
    (ds / "train-000000.tar").write_bytes(b"")
    return ["datasets", "show", str(ds)]


def corrupt_cohort_card(tmp, fx):
    c = fx.cohort(tmp)
    (c / "cohort.json").write_text('{"kind": "cohort", "class_na')
    return ["cohorts", "show", str(c)]


def manifest_edited_by_hand(tmp, fx):
    import pandas as pd

    c = fx.cohort(tmp)
    df = pd.read_parquet(c / "manifest.parquet")
    df.loc[3, "class_id"] = 1 - df.loc[3, "class_id"]  # someone "fixed" a label in a spreadsheet
    df.to_parquet(c / "manifest.parquet")
    return ["cohorts", "verify", str(c)]


def manifest_missing_a_column(tmp, fx):
    import pandas as pd

    c = fx.cohort(tmp)
    pd.read_parquet(c / "manifest.parquet").drop(columns=["flagged"]).to_parquet(c / "manifest.parquet")
    return ["cohorts", "verify", str(c)]


def manifest_not_parquet(tmp, fx):
    c = fx.cohort(tmp)
    (c / "manifest.parquet").write_text("key,class\nsyn-0,1\n")
    return ["cohorts", "verify", str(c)]


def shard_missing_a_sample(tmp, fx):
    import tarfile

    c = fx.cohort(tmp)
    shard = c / "synthetic-000000.tar"
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(shard, "w") as t:
        for m, data in members:
            if not m.name.startswith("s0000004."):
                t.addfile(m, io.BytesIO(data))
    return ["cohorts", "verify", str(c)]


def regenerate_unknown_sample(tmp, fx):
    return ["cohorts", "regenerate", str(fx.cohort(tmp)), "999", "--out", str(tmp / "x.png")]


def regenerate_to_a_jpeg(tmp, fx):
    return ["cohorts", "regenerate", str(fx.cohort(tmp)), "3", "--out", str(tmp / "x.jpg")]


def checkpoint_from_another_network(tmp, fx):
    m = fx.model(tmp)
    part = next(m.glob("class-*/model.json"))
    card = json.loads(part.read_text())
    card["network"]["channels"] = [c * 2 for c in card["network"]["channels"]]  # not what was trained
    part.write_text(json.dumps(card))
    return ["generate", str(m), "--per-class", "1", "--steps", "1", "--device", "cpu", "--storage", fx.storage(tmp)]


def evaluate_missing_cohort(tmp, fx):
    fx.cohort(tmp)  # storage holds a real cohort beside the mistyped one
    return ["evaluate", str(tmp / "st" / "cohorts" / "nosuch"), "--device", "cpu"]


def negative_seed(tmp, fx):
    return ["generate", str(fx.model(tmp)), "--per-class", "1", "--seed", "-5", "--device", "cpu",
            "--storage", fx.storage(tmp)]


def negative_split_seed(tmp, fx):
    return ingest_args(fx, tmp, f"zip:{fx.leukemia}", "--split-seed", "-1")


def negative_lr(tmp, fx):
    return ["train", fx.request.getfixturevalue("breastmnist_uri"), "--lr", "-1", "--steps", "1", "--device", "cpu",
            "--storage", fx.storage(tmp)]


def zero_channels(tmp, fx):
    return ["train", fx.request.getfixturevalue("breastmnist_uri"), "--channels", "0", "--attention-levels", "none",
            "--steps", "1", "--device", "cpu", "--storage", fx.storage(tmp)]


def negative_tstr_cap(tmp, fx):
    return ["evaluate", str(fx.cohort(tmp)), "--tstr", "--tstr-max-images", "-1", "--features", "domain",
            "--device", "cpu"]


def untrained_domain_classifier(tmp, fx):
    return ["calibrate", fx.request.getfixturevalue("breastmnist_uri"), "--domain-steps", "0", "--device", "cpu"]


def train_on_a_cohort(tmp, fx):
    return ["train", str(fx.cohort(tmp)), "--steps", "1", "--device", "cpu", "--storage", fx.storage(tmp)]


def train_on_the_dataset_folder(tmp, fx):
    src = Path(fx.request.getfixturevalue("breastmnist_uri"))  # a real version, under its dataset's folder
    shutil.copytree(src, tmp / "st" / "datasets" / "breastmnist" / src.name)
    return ["train", str(tmp / "st" / "datasets" / "breastmnist"), "--steps", "1", "--device", "cpu",
            "--storage", fx.storage(tmp)]


def dataset_show_on_the_cohorts_folder(tmp, fx):
    fx.cohort(tmp)
    return ["datasets", "show", str(tmp / "st" / "cohorts")]


CASES: list[tuple[str, Callable, str]] = [
    ("corrupt-npz", corrupt_npz, r"md5 mismatch for .*breastmnist\.npz.*re-download"),
    ("wrong-md5-npz", wrong_md5_npz, r"md5 mismatch for .*breastmnist\.npz: expected 750601b1"),
    ("missing-npz", missing_npz, r"bloodmnist\.npz not found in --medmnist-root .* download it from https://"),
    ("truncated-zip", truncated_zip, r"t\.zip is not a valid zip archive .*re-download"),
    ("damaged-zip-member", damaged_zip_member, r"d\.zip is damaged: entry 'a/1\.png' cannot be read"),
    ("zip-slip", zip_slip, r"'\.\./\.\./evil\.png' escapes the archive folder \(zip-slip\)"),
    ("absolute-path-in-zip", absolute_path_in_zip, r"'/etc/evil\.png' has an absolute path"),
    ("symlink-in-zip", symlink_in_zip, r"'b/2\.png' in .*l\.zip is a symbolic link; refusing"),
    ("symlink-out-of-folder", symlink_out_of_folder, r"link\.png is a symbolic link to .*secret\.png, outside"),
    ("zip-bomb", zip_bomb, r"'b/1\.png' in .*b\.zip inflates to 4194304 bytes .*zip bomb"),
    ("decompression-bomb", decompression_bomb, r"malignant/huge\.png is a decompression bomb .*remove it"),
    ("non-image-files-only", non_image_files_only, r"no images found .*each class folder needs at least one"),
    ("images-outside-class-folders", images_outside_class_folders, r"no images found for class folder"),
    ("single-class", single_class, r"only one class \('benign'\) .*needs at least two class folders"),
    ("empty-folder", empty_folder, r"no images found .* in .*src"),
    ("empty-class-folder", empty_class_folder, r"no images found for class folder\(s\) \['normal'\]"),
    ("same-file-in-two-classes", same_file_in_two_classes,
     r"same image is filed under two classes .*'benign/001\.png' \(benign\) and 'malignant/001\.png'"),
    ("same-class-name-in-two-folders", same_folder_name_twice, r"class name 'benign' comes from several folders"),
    ("non-utf8-name", non_utf8_name, r"file name b'benign/scan-\\xff\\xfe\.png' .* is not valid UTF-8; rename"),
    ("unknown-classes-glob", unknown_classes_glob, r"--classes pattern 'Original/Nosuch\*' matches no folder"),
    ("name-outside-the-layout", name_outside_the_layout, r"--name '\.\./escape' is not a usable name: use 1-64"),
    ("bad-window", bad_window, r"--window must be 'lo,hi' percentiles"),
    ("size-out-of-range", size_out_of_range, r"--size must be between 8 and 1024"),
    ("unknown-source-kind", unknown_source_kind, r"unknown source 'tiff:/data/scans': use medmnist:"),
    ("dataset-without-card", dataset_without_card, r"v1 is incomplete \(no dataset\.json\); re-run"),
    ("corrupt-cohort-card", corrupt_cohort_card, r"cohort\.json is corrupt"),
    ("manifest-edited-by-hand", manifest_edited_by_hand, r"s0000003: class \d in shard, \d in manifest(.|\n)*"
                                                         r"error: .*does not verify \(\d problem\(s\) listed above\)"),
    ("manifest-missing-a-column", manifest_missing_a_column, r"manifest\.parquet is missing columns \['flagged'\]"),
    ("manifest-not-parquet", manifest_not_parquet, r"manifest\.parquet is corrupt or unreadable"),
    ("shard-missing-a-sample", shard_missing_a_sample, r"manifest key s0000004 is missing from the shards"),
    ("regenerate-unknown-sample", regenerate_unknown_sample, r"sample id 999 is not in cohort .* \(0\.\.19\)"),
    ("regenerate-to-a-jpeg", regenerate_to_a_jpeg, r"--out .*x\.jpg must name a \.png file"),
    ("checkpoint-from-another-network", checkpoint_from_another_network,
     r"checkpoint .*does not fit the network in .*model\.json"),
    ("negative-seed", negative_seed, r"--seed must be a whole number from 0 to 2\^63 - 1, got -5"),
    ("negative-split-seed", negative_split_seed, r"--split-seed must be a whole number from 0 to 2\^63 - 1, got -1"),
    ("negative-lr", negative_lr, r"--lr must be > 0, not -1\.0"),
    ("zero-channels", zero_channels, r"channels \[0\] are not positive multiples of norm_num_groups"),
    ("negative-tstr-cap", negative_tstr_cap, r"--tstr-max-images must be ≥ 2 \(or left out for all\), got -1"),
    ("untrained-domain-classifier", untrained_domain_classifier,
     r"--domain-steps must be ≥ 1 \(an untrained domain classifier scores nothing\), got 0$"),
    ("train-on-a-cohort", train_on_a_cohort, r"c is a cohort, not what this command takes \(it has cohort\.json"),
    ("evaluate-missing-cohort", evaluate_missing_cohort, r"cohorts/nosuch does not exist$"),
    ("train-on-the-dataset-folder", train_on_the_dataset_folder,
     r"datasets/breastmnist is not a dataset version but holds 1 dataset version: pass it: "
     r".*datasets/breastmnist/\w+ \(`meddiff datasets list` lists them\)$"),
    ("dataset-show-on-the-cohorts-folder", dataset_show_on_the_cohorts_folder,
     r"st/cohorts holds cohorts, not dataset versions: pass a dataset version \(`meddiff datasets list`"),
]


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()} \
        if root.exists() else set()


def folders(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()} if root.exists() else set()


def run_cli(args: list[str]) -> tuple[int, str]:
    """(exit status, output) with a MeddiffError rendered as meddiff.cli.main prints it: ``error: <message>``."""
    from meddiff.cli import app, in_flags

    res = CliRunner().invoke(app, args)
    if isinstance(res.exception, MeddiffError):
        assert "\n" not in str(res.exception), "the error message spans several lines"
        return 2, res.output + f"error: {in_flags(str(res.exception), args)}"
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a crash: the product must turn this case into a MeddiffError
    return res.exit_code, res.output.strip()


@pytest.fixture()
def fx(medmnist_dir, leukemia_zip, request) -> Fx:
    return Fx(medmnist_dir, leukemia_zip, request)


@pytest.mark.parametrize("setup,message", [pytest.param(s, m, id=i) for i, s, m in CASES])
def test_bad_input_gets_one_clear_line_and_leaves_nothing(setup, message, fx, tmp_path):
    args = setup(tmp_path, fx)
    store = tmp_path / "st"
    before, before_folders = files(store), folders(store)
    code, out = run_cli(args)
    assert code != 0, out
    lines = out.splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, out
    assert re.search(message, out), out  # the error line (and, for verify, the problems listed above it)
    new = files(store) - before
    assert not [p for p in new if p.rsplit("/", 1)[-1] in RECORDS], new  # no new complete artifact
    debris = [p for p in files(store) if p.startswith(".staging/") or p.endswith(".tmp") or "/.trash-" in p]
    assert not debris, debris
    left = [f for f in folders(store) - before_folders if "/" in f and not f.rsplit("/", 1)[-1].startswith(".")]
    assert not left, f"a refused command left new folders behind: {left}"  # (layout folders and hidden ones aside)
    assert not (tmp_path.parent / "evil.png").exists() and not Path("/etc/evil.png").exists()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    """The same rendering from the real entry point (a subprocess)."""
    proc = subprocess.run([sys.executable, "-m", "meddiff", "ingest", f"zip:{tmp_path / 'none.zip'}",
                           "--storage", str(tmp_path / "st")], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()  # (the progress line, then) the error, last and alone
    assert lines[-1] == f"error: zip file not found: {tmp_path / 'none.zip'}"
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "st" / "datasets").exists()


def test_mixed_sizes_and_modes_are_accepted_and_recorded(fx, tmp_path):
    """Not errors: mixed sizes are resized/center-cropped, mixed gray/RGB become RGB, 16-bit is rescaled."""
    from meddiff.data.ingest import IngestConfig, ingest

    src = fx.breast_pngs(tmp_path / "src", n=4)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "benign" / "rgb-wide.png")
    Image.fromarray(np.full((20, 20), 3000, np.uint16)).save(src / "malignant" / "deep.png")
    r = ingest(IngestConfig(f"folder:{src}", size=16), str(tmp_path / "st"))
    assert r.card["channels"] == 3 and r.card["num_skipped"] == 0 and sum(r.card["totals"].values()) == 10
    assert r.card["intensity"]["bits"] == 12


# --- storage faults: disk full, permission denied, read-only, an S3 endpoint vanishing mid-upload -------------

def _no_debris(root: Path) -> None:
    assert not list(root.glob("datasets/*/*/dataset.json")), "a complete-looking dataset was published"
    assert not [p for p in root.rglob("*") if p.is_file() and (".staging" in p.parts or p.name.endswith(".tmp"))]


@pytest.mark.parametrize("fault,where,message", [
    ("ENOSPC", "shards", r"cannot write .*train-000001\.tar: No space left on device; the disk is full"),
    ("EACCES", "index", r"cannot write .*index\.parquet: Permission denied; permission denied: make it writable"),
    ("EROFS", "publish", r"cannot write .*: Read-only file system; the storage is read-only"),
])
def test_storage_fault_is_named_nothing_published_and_rerun_completes(fault, where, message, medmnist_dir,
                                                                     tmp_path, monkeypatch):
    import errno

    import meddiff.data.ingest as ingest_mod
    from meddiff import storage
    from meddiff.data.ingest import IngestConfig, ingest
    from meddiff.data.shards import ShardSink
    from meddiff.errors import StorageError

    code = getattr(errno, fault)
    err = lambda path: OSError(code, os.strerror(code), str(path))  # noqa: E731
    if where == "shards":  # the disk fills while the second training shard is written
        real_write = ShardSink.write

        def write(self, sample):
            if "train-000001" in self.writer.fname:
                raise err(self.writer.fname)
            return real_write(self, sample)
        monkeypatch.setattr(ShardSink, "write", write)
    elif where == "index":
        monkeypatch.setattr(ingest_mod.pq, "write_table", lambda table, path, **kw: (_ for _ in ()).throw(err(path)))
    else:
        real_replace, real_rename = os.replace, os.rename  # the publish rename (compare-and-swap) fails
        monkeypatch.setattr(storage.os, "replace", lambda a, b: (_ for _ in ()).throw(err(b)) if "datasets" in str(b)
                            else real_replace(a, b))
        monkeypatch.setattr(storage.os, "rename", lambda a, b: (_ for _ in ()).throw(err(b)) if "datasets" in str(b)
                            else real_rename(a, b))
    cfg = IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir), shard_size=200)
    root = tmp_path / "st"
    with pytest.raises(StorageError, match=message) as info:
        ingest(cfg, str(root))
    assert "\n" not in str(info.value)
    _no_debris(root)
    monkeypatch.undo()
    r = ingest(cfg, str(root))
    assert not r.existed and r.card["totals"] == {"train": 546, "val": 78, "test": 156}
    assert Path(r.uri, "train-000002.tar").is_file()


PROXY = r"""
import asyncio, sys
listen, target = int(sys.argv[1]), int(sys.argv[2])
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(r, w):
    tr, tw = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(r, tw), pipe(tr, w))
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", listen, reuse_address=True)
    print("ready", flush=True)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_proxy(port: int, target: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PROXY, str(port), str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_s3_endpoint_vanishing_mid_upload(medmnist_dir, tmp_path, monkeypatch):
    """The S3 endpoint (a proxy process in front of moto) is killed after two uploads of the publish."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    from meddiff import storage
    from meddiff.data.ingest import IngestConfig, ingest
    from meddiff.data.shards import open_dataset
    from meddiff.errors import StorageError

    import s3fs

    # fsspec caches one S3FileSystem per endpoint, listings included: an earlier test's server may have had
    # this port, and its cached listing would make this dataset look published already
    s3fs.S3FileSystem.clear_instance_cache()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    port = _free_port()
    proxy = _start_proxy(port, server.get_host_and_port()[1])
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="meddiff")
        real, uploads = storage.with_retries, []

        def with_retries(fn, what, attempts=3, backoff_s=1.0):
            if what.startswith("upload to"):
                uploads.append(what)
                if len(uploads) == 3:
                    proxy.kill()  # the endpoint vanishes mid-publish
                    proxy.wait()
            return real(fn, what, attempts, 0.05)
        monkeypatch.setattr(storage, "with_retries", with_retries)
        cfg = IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir))
        root = f"s3://meddiff/{tmp_path.name}"  # moto's in-process state outlives a server: a prefix of our own
        with pytest.raises(StorageError, match=rf"upload to {root}/datasets/breastmnist/\w+/\S+ failed after 3"):
            ingest(cfg, root)
        proxy = _start_proxy(port, server.get_host_and_port()[1])  # the endpoint comes back
        s3fs.S3FileSystem.clear_instance_cache()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="meddiff", Prefix=tmp_path.name).get("Contents", [])
                if "/.locks/" not in o["Key"]]  # the builder's lock object stays until it expires (meddiff.locks)
        assert len(keys) == 2 and not any(k.endswith("dataset.json") for k in keys)  # partial, not complete-looking
        r = ingest(cfg, root)
        assert not r.existed and open_dataset(r.uri).card["totals"]["train"] == 546
        assert len(open_dataset(r.uri).load_split("val")[0]) == 78
    finally:
        proxy.kill()
        server.stop()
