"""DICOM ingest on real scanner files (the CT, MR and ultrasound files bundled with pydicom): every .dcm
was skipped as "not an image file", so a clinical export could not be ingested at all."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.processing import apply_modality_lut, apply_windowing

from meddiff.data.dicom import to_image
from meddiff.data.images import Intensity
from meddiff.data.ingest import IngestConfig, ingest
from meddiff.data.pixel_survey import ingest_notes
from meddiff.data.shards import open_dataset

CT = ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"]  # CT_small has no window: its min..max
MR = ["MR_small.dcm", "MR_small_RLE.dcm", "examples_overlay.dcm"]
REFUSED = {"rtdose.dcm": "multi-frame DICOM (15 frames", "reportsi.dcm": "DICOM without an image (SR",
           "JPEG-lossy.dcm": "Pillow does not support 'JPEG Extended'"}  # malformed: no codec reads it


def _folder(root: Path, extra: dict[str, list[str]] | None = None) -> Path:
    for cls, names in {"ct": CT, "mr": MR, **(extra or {})}.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy(get_testdata_file(n), root / cls / n)
    return root


def _by_source(uri: str) -> dict[str, np.ndarray]:
    ds = open_dataset(uri)
    idx = ds.index()
    out = {}
    for split in ("train", "val", "test"):
        x, _ = ds.load_split(split)
        keys = idx[idx.split == split].sort_values("key").source_id.tolist()
        out.update(zip(keys, x))
    return out


@pytest.mark.parametrize("name", ["MR_small.dcm", "examples_overlay.dcm", "693_J2KI.dcm"])
def test_the_files_window_matches_pydicoms(name):
    """Our window (PS3.3 C.11.2.1.2) against pydicom's apply_windowing, normalised by its output range."""
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    y = apply_windowing(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), ds)
    bits = ds.BitsStored
    lo, hi = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds:
        lo, hi = (v * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in (lo, hi))
    want = np.rint((y - lo) / (hi - lo) * 255)
    got = np.asarray(to_image(Path(path).read_bytes(), Intensity()), dtype=np.float64)
    assert got.shape == want.shape and np.abs(got - want).max() == 0


def test_a_dicom_folder_ingests_as_viewers_show_it(tmp_path, caplog):
    src = _folder(tmp_path / "scans", {"mr": MR + list(REFUSED)})
    res = ingest(IngestConfig(f"folder:{src}", size=128), str(tmp_path / "st"))  # CT_small's own size
    # a file that fails to decode is a skip with its reasons, not pydicom's traceback at ERROR in the run's log
    assert not [r for r in caplog.records if r.name.startswith("pydicom") and r.levelno >= 40]
    card = res.card
    assert card["channels"] == 1 and sum(card["totals"].values()) == 6
    assert {s["source_id"].split("/")[-1]: s["reason"] for s in card["skipped"]}.keys() == REFUSED.keys()
    for s in card["skipped"]:
        assert REFUSED[s["source_id"].split("/")[-1]] in s["reason"]
    # by header: the 6 read + JPEG-lossy (no window; fails to decode); rtdose and the report are no images
    assert card["pixels"]["dicom"]["display"] == {"min..max": 2, "own window": 5}
    assert ingest_notes(card)[0].endswith("decode are skipped): 2 by min..max, 5 by own window")
    images = _by_source(res.uri)
    ct = images["ct/CT_small.dcm"][0]
    assert ct.min() == 0 and ct.max() == 255  # no window in the file: its own min..max


def test_monochrome1_is_inverted_and_window_percentiles_replace_the_files_window(tmp_path):
    src = _folder(tmp_path / "scans")
    ds = pydicom.dcmread(src / "mr" / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"  # the same pixels, stored "higher = darker"
    ds.save_as(src / "mr" / "MR_small_m1.dcm")
    res = ingest(IngestConfig(f"folder:{src}", size=64), str(tmp_path / "st"))
    images = _by_source(res.uri)
    assert np.array_equal(images["mr/MR_small_m1.dcm"], 255 - images["mr/MR_small.dcm"])
    assert res.card["pixels"]["dicom"]["monochrome1_inverted"] == 1
    windowed = _by_source(ingest(IngestConfig(f"folder:{src}", size=64, window="1,99"), str(tmp_path / "st")).uri)
    own = images["mr/MR_small.dcm"].astype(int)
    pct = windowed["mr/MR_small.dcm"].astype(int)
    assert pct.min() == 0 and pct.max() == 255 and np.abs(pct - own).mean() > 5


def test_colour_dicom_makes_an_rgb_dataset(tmp_path):
    src = _folder(tmp_path / "scans", {"us": ["examples_palette.dcm", "examples_rgb_color.dcm"]})
    card = ingest(IngestConfig(f"folder:{src}", size=64), str(tmp_path / "st")).card
    assert card["channels"] == 3 and card["pixels"]["first_colour_image"].startswith("us/")


def test_bit_depth_is_said_to_leave_dicom_alone(tmp_path):
    src = _folder(tmp_path / "scans")
    card = ingest(IngestConfig(f"folder:{src}", size=64, bit_depth=12), str(tmp_path / "st")).card
    assert ingest_notes(card)[-1] == ("--bit-depth 12 not applied (DICOM is displayed by its own header; every other "
                                      "input is 8-bit)")


def test_dicom_files_named_as_pacs_exports_name_them_are_found(tmp_path):
    """PACS exports name files IM0001 or by UID (1.2.840….320): no image extension, so every one was skipped."""
    src = tmp_path / "export"
    for cls, name, new in (("ct", "CT_small.dcm", "1.2.840.113619.2.55.3.320"), ("ct", "693_J2KI.dcm", "IM0001"),
                           ("mr", "MR_small.dcm", "IM0001"), ("mr", "examples_overlay.dcm", "IM0002")):
        (src / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), src / cls / new)
    (src / "mr" / "NOTES").write_text("not an image")
    card = ingest(IngestConfig(f"folder:{src}", size=64), str(tmp_path / "st")).card
    assert sum(card["totals"].values()) == 4 and card["pixels"]["dicom"]["files"] == 4
    assert card["skipped"] == [{"source_id": "mr/NOTES", "reason": "not an image file (no extension)"}]


def test_every_frame_of_a_multi_frame_dicom_with_frames_all(tmp_path):
    """rtdose.dcm (15 frames) and a 30-frame colour clip could only be skipped ("multi-frame DICOM"); with
    --frames all each frame is an image, decoded as pydicom decodes that frame, a file's frames in one split."""
    src = _folder(tmp_path / "scans", {"mr": MR + ["rtdose.dcm"], "us": ["examples_ybr_color.dcm"]})
    first = ingest(IngestConfig(f"folder:{src}", size=64), str(tmp_path / "st"))
    assert {s["source_id"] for s in first.card["skipped"]} == {"mr/rtdose.dcm", "us/examples_ybr_color.dcm"}
    res = ingest(IngestConfig(f"folder:{src}", size=64, frames="all"), str(tmp_path / "st"))
    idx = open_dataset(res.uri).index()
    for name, n in (("mr/rtdose.dcm", 15), ("us/examples_ybr_color.dcm", 30)):
        frames = idx[idx.source_id.str.startswith(f"{name}#")]
        assert sorted(frames.source_id) == sorted(f"{name}#{k}" for k in range(n)) and frames.split.nunique() == 1
    assert res.card["channels"] == 3 and res.card["pixels"]["frame_images"] == 45
    assert "each of their 45 frames is an image" in " ".join(ingest_notes(res.card))
    data = Path(get_testdata_file("rtdose.dcm")).read_bytes()
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    for k in (0, 7, 14):  # no window in the file: each frame's own min..max, as for a single-frame file
        x = apply_modality_lut(ds.pixel_array[k], ds).astype(np.float64)
        want = np.rint((x - x.min()) / (x.max() - x.min()) * 255)
        assert np.array_equal(np.asarray(to_image(data, Intensity(), k), dtype=np.float64), want)
