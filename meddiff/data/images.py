"""Image conversions shared by every stage: resize/crop, lossless PNG bytes, decoding, 8-bit rescaling.

Inputs deeper than 8 bits (16-bit "I;16", 32-bit "I", float "F") are rescaled to 8 bits by a
recorded :class:`Intensity` rule, never clipped: integers by their bit depth
(v → round(v · 255 / (2^bits − 1))), or any input by a per-image percentile window.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageOps

HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # Pillow modes deeper than 8 bits
GRAY_MODES = ("L", "1", "LA", *HIGH_BIT_MODES)
EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera sets instead of rotating the pixels (1 = as stored)
GREY_TOLERANCE = 2  # a colour-encoded image is grey when no pixel's R, G, B differ by more (encoders' rounding)


@dataclass(frozen=True)
class Intensity:
    """How high-bit-depth pixels become 8-bit; stated on the dataset card."""

    bits: int | None = None  # integer inputs: v → round(v · 255 / (2^bits − 1)); None = per image, from its max
    window: tuple[float, float] | None = None  # (lo, hi) percentiles per image → 0..255 instead (any input)

    def describe(self) -> dict:
        if self.window:
            return {"rule": "percentile-window", "percentiles": list(self.window)}
        return {"rule": "bit-depth", "bits": self.bits,
                "float": "values in [0, 1] × 255, otherwise the image's min..max → 0..255"}


def bits_for(max_value: int) -> int:
    """The even bit depth (≥ 8) that holds ``max_value``: 4095 → 12, 30000 → 16."""
    b = max(8, int(max_value).bit_length())
    return b + (b % 2)


def percentile_window(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values → 0..255 between their ``lo`` and ``hi`` percentiles, clipped outside (all 0 when flat)."""
    a, b = np.percentile(arr, [lo, hi])
    if b <= a:
        return np.zeros(arr.shape, np.uint8)
    return np.rint(np.clip((arr - a) / (b - a), 0, 1) * 255).astype(np.uint8)


def high_bit_to_8bit(im: Image.Image, rule: Intensity) -> Image.Image:
    """Rescale an "I;16"/"I"/"F" image to "L" by ``rule``."""
    arr = np.asarray(im)
    if rule.window:
        return Image.fromarray(percentile_window(arr.astype(np.float64), *rule.window), mode="L")
    if im.mode == "F":
        a = arr.astype(np.float64)
        if a.size and a.min() >= 0 and a.max() <= 1:
            out = np.rint(a * 255).astype(np.uint8)
        else:
            out = percentile_window(a, 0, 100)
        return Image.fromarray(out, mode="L")
    a = arr.astype(np.int64)
    bits = rule.bits or bits_for(int(a.max()) if a.size else 0)
    return Image.fromarray(bits_to_8bit(a, bits), mode="L")


def bits_to_8bit(a: np.ndarray, bits: int) -> np.ndarray:
    """Integers of ``bits`` bits → uint8: v → round(v · 255 / (2^bits − 1)), clipped to 0..2^bits − 1 first."""
    return np.rint(np.clip(a, 0, 2**bits - 1) * (255 / (2**bits - 1))).astype(np.uint8)


def holds_grey(im: Image.Image) -> bool:
    """True when ``im`` is grey: a grey mode, or colour channels (RGB, RGBA, palette, CMYK, …) equal within
    ``GREY_TOLERANCE`` at every pixel, e.g. a radiograph saved as an RGB JPEG. Decodes ``im``."""
    if im.mode in GRAY_MODES:
        return True
    r, g, b = im.convert("RGB").split()  # in Pillow: 20× faster than numpy's max/min over a 3-long axis
    spread = max(ImageChops.difference(x, y).getextrema()[1] for x, y in ((r, g), (g, b), (r, b)))
    return spread <= GREY_TOLERANCE


def reoriented(im: Image.Image) -> bool:
    """True when ``im`` carries an EXIF orientation other than "as stored" (reading turns it upright)."""
    return im.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9)


def see_through(im: Image.Image) -> bool:
    """True when a pixel of ``im`` is not fully opaque (alpha channel or transparent palette entry). Reading
    drops alpha, so such a pixel keeps its stored colour. Decodes ``im`` only when it carries alpha."""
    return im.has_transparency_data and im.convert("RGBA").getchannel("A").getextrema()[0] < 255


def to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 H×W (grayscale) or H×W×3 (RGB) array to a PIL image."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr), mode="L" if arr.ndim == 2 else "RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to ``size`` (bicubic/antialiased), then center-crop to size×size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def encode_png(img: Image.Image | np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes (no timestamps or text chunks)."""
    if isinstance(img, np.ndarray):
        img = to_pil(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes to uint8 C×H×W (C = 1 or 3)."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im)  # writable copy
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def pixel_difference(a: bytes, b: bytes) -> tuple[int, int]:
    """(pixel values that differ, largest absolute difference in grey levels) of two same-shaped PNGs."""
    x, y = decode_png(a).astype(np.int16), decode_png(b).astype(np.int16)
    if x.shape != y.shape:
        raise ValueError(f"PNG shapes differ: {x.shape} vs {y.shape}")
    d = np.abs(x - y)
    return int((d > 0).sum()), int(d.max(initial=0))


def load_image(data: bytes, channels: int | None = None, intensity: Intensity = Intensity(),
               frame: int | None = None) -> Image.Image:
    """Decode arbitrary image bytes fully (raises on truncated/corrupt data and decompression bombs); ``frame``:
    that page or frame of a multi-frame file (None: the first; a multi-frame DICOM is refused).

    ``channels`` forces 1 (L) or 3 (RGB); None keeps grayscale as L and converts others to RGB.
    Deeper than 8 bits ("I;16", "I", "F") is rescaled by ``intensity``, never clipped. An EXIF
    orientation is applied: the pixels come out as image viewers show them. DICOM is read by
    :mod:`meddiff.data.dicom`.
    """
    from meddiff.data import dicom

    if dicom.is_dicom(data):
        im = dicom.to_image(data, intensity, frame)
        return im.convert({1: "L", 3: "RGB"}.get(channels or 0) or im.mode)
    with Image.open(io.BytesIO(data)) as opened:
        if frame:
            opened.seek(frame)
        opened.load()
        im = ImageOps.exif_transpose(opened) if reoriented(opened) else opened
        mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if im.mode in GRAY_MODES else "RGB")
        if im.mode in HIGH_BIT_MODES:
            return high_bit_to_8bit(im, intensity).convert(mode)
        return im.convert(mode)
