"""Image conversions shared by every stage: resize/crop, lossless PNG bytes, decoding."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


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


def load_image(data: bytes, channels: int | None = None) -> Image.Image:
    """Decode arbitrary image bytes fully (raises on truncated/corrupt data).

    ``channels`` forces 1 (L) or 3 (RGB); None keeps grayscale as L and converts others to RGB.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if im.mode in ("L", "I;16", "I", "1") else "RGB")
        return im.convert(mode)
