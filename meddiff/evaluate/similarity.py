"""Pixel-space similarity: SSIM to the nearest real image, and intra-class diversity.

SSIM: Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity",
IEEE TIP 2004 (Gaussian window 11, σ = 1.5, data range 1). MS-SSIM: Wang et al., "Multiscale
structural similarity for image quality assessment", Asilomar 2003 — needs images of at least
(11 − 1)·2⁴ + 1 = 161 px for its standard 5 scales.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                           structural_similarity_index_measure)

MS_SSIM_MIN_SIZE = (11 - 1) * 2 ** 4 + 1  # Gaussian window 11, 5 scales (4 downsamplings)


SSIM_BATCH_ELEMENTS = 2**18  # pixel values per SSIM batch (~100 MiB of torchmetrics intermediates)


def ssim_pairs(a: torch.Tensor, b: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """SSIM of each pair (a_i, b_i): a, b N×C×H×W, float in [0, 1] or uint8 (converted per batch) → N values.

    Batches of ``SSIM_BATCH_ELEMENTS`` pixel values (batch 111 at 28 px RGB, 8 at 128 px): torchmetrics'
    SSIM holds ~400 bytes of intermediates per pixel value of a pair (measured at 28 px RGB: batch 1024 →
    +0.86 GiB peak, 128 → +0.13 GiB, and no slower), so the batch shrinks as images grow."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    batch = batch or max(8, SSIM_BATCH_ELEMENTS // max(1, int(np.prod(a.shape[1:]))))
    out = [structural_similarity_index_measure(_f(a[i:i + batch]), _f(b[i:i + batch]), data_range=1.0,
                                               reduction="none") for i in range(0, len(a), batch)]
    return torch.cat(out).reshape(-1) if out else torch.zeros(0)


def _f(x) -> torch.Tensor:
    """A batch as float in [0, 1] (uint8 arrays/tensors are converted here, batch by batch)."""
    t = torch.as_tensor(np.ascontiguousarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.float().div(255) if t.dtype == torch.uint8 else t.float()


def ms_ssim_pairs(a: torch.Tensor, b: torch.Tensor, batch: int = 64) -> torch.Tensor | None:
    """MS-SSIM of each pair, or None when the images are smaller than MS_SSIM_MIN_SIZE."""
    if min(a.shape[-2:]) < MS_SSIM_MIN_SIZE:
        return None
    out = [multiscale_structural_similarity_index_measure(a[i:i + batch], b[i:i + batch], data_range=1.0,
                                                          reduction="none") for i in range(0, len(a), batch)]
    return torch.cat(out).reshape(-1)


def random_pairs(n: int, max_pairs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_pairs`` index pairs (i, j), i ≠ j, of n items: all pairs when few, else random ones."""
    if n < 2:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
        return i, j
    i = torch.randint(0, n, (max_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (max_pairs,), generator=generator)) % n  # uniform over j ≠ i
    return i, j


def pairwise_ssim(x: torch.Tensor, max_pairs: int = 1000, seed: int = 0) -> torch.Tensor:
    """SSIM over (random) distinct pairs within a set x N×C×H×W: the values whose mean is the
    intra-set similarity (higher = less diverse; 1 = all images identical)."""
    i, j = random_pairs(len(x), max_pairs, torch.Generator().manual_seed(seed))
    return ssim_pairs(x[i.numpy()] if isinstance(x, np.ndarray) else x[i], x[j.numpy()] if isinstance(x, np.ndarray) else x[j])
