"""UMAP of real vs synthetic features, one panel per class (McInnes et al. 2018, umap-learn) → PNG bytes.

One embedding is fitted on the real and synthetic features together (so the two sets share the
map), then drawn per class: real images as grey dots, synthetic ones in colour. Overlapping clouds
mean the generator covers that class's real feature distribution; a synthetic cloud off to one side,
or collapsed into a point, is what FID/precision/recall summarise as one number.
"""

from __future__ import annotations

import math
from functools import cache
from types import ModuleType

import numpy as np

from meddiff.errors import MeddiffError
from meddiff.figures import new_figure, to_png

UMAP_MODULES = ("umap_", "layouts", "utils", "spectral", "distances", "sparse")  # where its numba functions live


def load_umap() -> ModuleType:
    """umap-learn, its numba functions compiled once per machine rather than once per process."""
    try:
        import umap
    except ImportError:
        raise MeddiffError("the UMAP plot needs umap-learn: pip install 'umap-learn==0.5.12'") from None
    _cache_compiled(umap)
    return umap


@cache  # once per process
def _cache_compiled(umap: ModuleType) -> None:
    """umap-learn caches few of its ~110 numba functions, so each process compiled the rest before its first
    fit: 10–13 s of a 30 s CPU evaluation on 2 cores. With caching on, numba keeps the machine code beside its
    other caches (NUMBA_CACHE_DIR, else umap's __pycache__, else the user's cache folder) and later processes
    load it (the same fit: 0.4 s). A function numba cannot cache is simply compiled as before."""
    import importlib

    from numba.core.registry import CPUDispatcher

    for name in UMAP_MODULES:
        for f in vars(importlib.import_module(f"umap.{name}")).values():
            if isinstance(f, CPUDispatcher):
                try:
                    f.enable_caching()
                except Exception:  # noqa: BLE001 - no writable cache location: compile per process, as before
                    return


def embed(features: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """UMAP of features (N, D) → (N, 2), seeded (single-threaded, reproducible)."""
    umap = load_umap()
    if len(features) < 4:
        raise MeddiffError(f"UMAP needs at least 4 feature vectors, got {len(features)}")
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(features) - 1), min_dist=min_dist, random_state=seed,
                        n_jobs=1)
    return reducer.fit_transform(np.asarray(features, np.float32))


def umap_png(real: np.ndarray, real_labels: np.ndarray, syn: np.ndarray, syn_labels: np.ndarray,
             class_names: list[str], title: str = "UMAP of features: real (grey) vs synthetic", seed: int = 0
             ) -> bytes:
    """PNG bytes: one panel per class (plus "all classes"); real (R, D) and synthetic (S, D) features
    with their class ids (R,), (S,)."""
    from matplotlib import colormaps

    xy = embed(np.concatenate([real, syn]), seed=seed)  # (R+S, 2)
    xy_real, xy_syn = xy[: len(real)], xy[len(real):]
    panels = [("all classes", None)] + [(name, c) for c, name in enumerate(class_names)]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(figsize=(3.2 * cols, 3.0 * rows))  # no pyplot; drawn under meddiff.figures' lock
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = colormaps["tab10"]
    for ax, (name, c) in zip(axes.ravel(), panels):
        ax.scatter(xy_real[:, 0], xy_real[:, 1], s=3, c="#dddddd")  # every real point: the map's outline
        r = xy_real if c is None else xy_real[real_labels == c]
        s = xy_syn if c is None else xy_syn[syn_labels == c]
        ax.scatter(r[:, 0], r[:, 1], s=4, c="#777777", label=f"real ({len(r)})")
        ax.scatter(s[:, 0], s[:, 1], s=5, color=colours((c or 0) % 10), label=f"synthetic ({len(s)})")
        ax.set_title(name[:30], fontsize=8)
        ax.legend(fontsize=6, loc="best")
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return to_png(fig, dpi=100)
