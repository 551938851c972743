"""Image grids and GIFs as PNG/GIF bytes (PIL; no figure state)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def tile(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) → one uint8 (H', W', C) mosaic with ``cols`` columns."""
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = \
            img.transpose(1, 2, 0)  # (C, H, W) → (H, W, C)
    return out


def _pil(mosaic: np.ndarray, scale: int) -> Image.Image:
    im = Image.fromarray(mosaic[:, :, 0] if mosaic.shape[2] == 1 else mosaic)
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) if scale > 1 else im


def image_grid(images: np.ndarray, cols: int | None = None, scale: int | None = None) -> bytes:
    """PNG bytes of a grid of uint8 (N, C, H, W) images (small images are upscaled for viewing)."""
    scale = scale or max(1, 64 // images.shape[-1])
    buf = io.BytesIO()
    _pil(tile(images, cols), scale).save(buf, format="PNG")
    return buf.getvalue()


def save_gif(frames: np.ndarray, duration_ms: int = 250) -> bytes:
    """GIF bytes from uint8 (F, N, C, H, W): frame f shows the N images side by side."""
    scale = max(1, 64 // frames.shape[-1])
    ims = [_pil(tile(f, cols=f.shape[0]), scale).convert("P") for f in frames]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=duration_ms, loop=0)
    return buf.getvalue()
