"""DICOM files → 8-bit images as a viewer shows them (pydicom decodes; the display rules are here).

Monochrome: stored values → modality values by the Modality LUT (RescaleSlope/RescaleIntercept: CT in
HU), then the file's own VOI transform onto 0..255: its first WindowCenter/WindowWidth by its
VOILUTFunction (PS3.3 C.11.2.1.2), or its VOI LUT; a file with neither maps its own min..max.
``--window lo,hi`` percentiles replace all of these. MONOCHROME1 (higher = darker) is inverted, so dense
is white as in MONOCHROME2. Colour (RGB, YBR_*, PALETTE COLOR) becomes 8-bit RGB. A multi-frame file (a
volume or a clip) is refused with its reason unless a frame is asked for (ingest's ``--frames all``: each
frame by the file's top-level display rules), and so is a DICOM without pixels.
"""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

from meddiff.data.images import Intensity, bits_to_8bit, percentile_window

DICOM_EXTS = (".dcm", ".dicom")


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then "DICM"."""
    return data[128:132] == b"DICM"


def voi_window(x: np.ndarray, c: float, w: float, function: str = "LINEAR") -> np.ndarray:
    """Modality values ``x`` → [0, 1] through window centre ``c`` and width ``w`` (PS3.3 C.11.2.1.2-3).

    LINEAR:       y = (x − (c − ½)) / (w − 1) + ½, clipped to [0, 1]   (w ≥ 1)
    LINEAR_EXACT: y = (x − c) / w + ½,              clipped to [0, 1]   (w > 0)
    SIGMOID:      y = 1 / (1 + exp(−4 (x − c) / w))
    """
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0, 1)
    return np.clip((x - (c - 0.5)) / max(w - 1, 1e-9) + 0.5, 0, 1)


@dataclass(frozen=True)
class DicomInfo:
    """What ingest's survey needs from a header (no pixels read)."""

    grey: bool  # MONOCHROME1/2
    display: str  # "own window" | "own VOI LUT" | "min..max" | "colour"
    inverted: bool  # MONOCHROME1
    frames: int = 1  # NumberOfFrames


def _read(data: bytes, pixels: bool = True, frame: int | None = None):
    """The dataset; ``frame``: the one frame of a multi-frame file to decode (None: a multi-frame file is
    refused)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and frame is None:
        raise ValueError(f"multi-frame DICOM ({frames} frames: a volume or a clip), not one 2D image; ingest with "
                         "--frames all to read each frame as an image, or export the frames you want as files")
    if frames > 1 and pixels:
        ds.pixel_array_options(index=frame)  # decodes that frame only
    if "Rows" not in ds or (pixels and "PixelData" not in ds):
        raise ValueError(f"DICOM without an image ({ds.get('Modality', 'no modality')}, e.g. a report)")
    return ds


def _info(ds) -> DicomInfo:
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    grey = pi.startswith("MONOCHROME")
    display = ("colour" if not grey else "own window" if "WindowCenter" in ds and "WindowWidth" in ds
               else "own VOI LUT" if "VOILUTSequence" in ds else "min..max")
    return DicomInfo(grey, display, pi == "MONOCHROME1", int(ds.get("NumberOfFrames", 1) or 1))


def info(data: bytes, frames: bool = False) -> DicomInfo:
    """The header's display facts; raises ValueError for a file ingest skips (no image; multi-frame unless
    ``frames``)."""
    return _info(_read(data, pixels=False, frame=0 if frames else None))



@contextmanager
def _quiet_decoders():
    """pydicom logs each failing plugin's traceback at ERROR (under Prefect: in the run's log) although the
    file is only skipped, its reasons listed; the failure is reported once, by the skip."""
    log = logging.getLogger("pydicom.pixels.decoders.base")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _decoded(ds) -> np.ndarray:
    try:
        with _quiet_decoders():
            return ds.pixel_array  # YBR_* arrive as RGB
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for a missing codec
        why = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip()) or str(e)  # per plugin
        raise ValueError(f"DICOM pixels in {ds.file_meta.TransferSyntaxUID.name} could not be decoded ({why}); "
                         "without a plugin for them, pip install 'meddiff[dicom]' (pylibjpeg: JPEG, JPEG-LS, "
                         "JPEG 2000) and ingest again") from None


def to_image(data: bytes, intensity: Intensity, frame: int | None = None) -> Image.Image:
    """A DICOM file's image (``frame`` of a multi-frame one), 8-bit "L" (monochrome) or "RGB", by the rules in
    the module docstring."""
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi

    ds = _read(data, frame=frame)
    arr = _decoded(ds)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)  # H×W×3 at the palette's bit depth
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(bits_to_8bit(rgb, bits) if rgb.dtype != np.uint8 else rgb, mode="RGB")
    if not pi.startswith("MONOCHROME"):
        rgb = arr if arr.dtype == np.uint8 else bits_to_8bit(arr, int(ds.BitsStored))
        return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    modality = apply_modality_lut(arr, ds)  # H×W modality values (HU for CT)
    x = modality.astype(np.float64)
    display = _info(ds).display
    if intensity.window:
        out = percentile_window(x, *intensity.window)
    elif display == "own window":
        c, w = (float(np.atleast_1d(v)[0]) for v in (ds.WindowCenter, ds.WindowWidth))
        out = np.rint(voi_window(x, c, w, str(ds.get("VOILUTFunction", "LINEAR")).upper()) * 255).astype(np.uint8)
    elif display == "own VOI LUT":
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = bits_to_8bit(apply_voi(modality, ds), bits)
    else:
        out = percentile_window(x, 0, 100)  # the image's min..max
    if pi == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, mode="L")
