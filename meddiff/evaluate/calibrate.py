"""Calibration: three reference "generators" built from real data, each scored by the normal
evaluation (:func:`meddiff.evaluate.scoring.evaluate_images`), so a reader can see what pass,
memorization and collapse look like on this dataset.

- ``perfect``: held-out real images (half of the test split; the other half stays the held-out
  reference), as many as a typical cohort. Should pass every fidelity metric.
- ``memorizer``: training images, in four equal groups: exact copies, left–right mirrored, lightly
  noised (Gaussian, ``noise_std`` grey levels), JPEG-recompressed. Should be flagged and fail.
- ``collapsed``: each class drawn from ``collapsed_sources`` training images plus small noise.
  Should fail recall / coverage / diversity.

With ``tstr``, a classifier trained on each generator's images is compared with one trained on as
many real training images of the same class mix (same steps, tested on the held-out half): the
perfect generator's accuracy should match real at equal size.

Writes ``calibration.json`` then ``calibration.html`` under
``<storage root>/calibration/<dataset>/<version>/<config hash>/`` (content-addressed: a re-run
with the same config reuses them).
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from meddiff import storage
from meddiff.data.shards import open_dataset
from meddiff.devices import resolve_device
from meddiff.errors import MeddiffError, check_seed
from meddiff.evaluate.config import EvalConfig
from meddiff.evaluate.features import load_inception, load_or_train_domain, real_features
from meddiff.evaluate.loading import Images, RealSplits, load_real
from meddiff.evaluate.report import REPORT_SCHEMA_VERSION
from meddiff.evaluate.scoring import evaluate_images
from meddiff.evaluate.summary import headline_rows
from meddiff.progress import Progress, tell
from meddiff.records import content_hash, make_record
from meddiff.threads import configure_threads

GENERATORS = ("perfect", "memorizer", "collapsed")


@dataclass(frozen=True)
class CalibrationConfig:
    cohort_size: int = 400  # images per reference generator (a typical cohort: the README pipeline's 8 × 50)
    noise_std: float = 1.5  # grey levels of Gaussian noise (memorizer's noised group, collapsed set)
    jpeg_quality: int = 95  # the memorizer's JPEG-recompressed group
    collapsed_sources: int = 5  # training images per class behind the collapsed generator
    seed: int = 0  # which images are drawn
    tstr: bool = True  # TSTR of each generator beside real training images of the same size and class mix
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(features=("domain",)))  # the normal evaluation

    def check(self) -> "CalibrationConfig":
        check_seed(self.seed)
        if self.cohort_size < 10:
            raise MeddiffError(f"--cohort-size must be ≥ 10 (a reference cohort like a real one), "
                               f"not {self.cohort_size}")
        return self


def _noisy(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x.astype(np.float32) + rng.normal(0, std, x.shape), 0, 255).round().astype(np.uint8)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    """uint8 C×H×W → JPEG-encoded and decoded again (same shape)."""
    img = Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    arr = np.array(Image.open(io.BytesIO(buf.getvalue())))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def reference_generators(real: RealSplits, cfg: CalibrationConfig) -> tuple[dict[str, Images], RealSplits]:
    """The three reference cohorts and the real splits to score them against (held-out = the test
    half the perfect generator does not use)."""
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(real.heldout))
    half = len(perm) // 2
    ref_idx, perfect_idx = np.sort(perm[:half]), np.sort(perm[half:][: cfg.cohort_size])
    n = len(perfect_idx)
    if n < 2:
        raise MeddiffError(f"the test split has {len(real.heldout)} images: too few to calibrate")
    perfect = real.heldout.take(perfect_idx)
    mem = real.train.take(np.sort(rng.choice(len(real.train), n, replace=False)))
    x = mem.x.copy()
    g = np.arange(n) % 4  # 0 copy, 1 mirrored, 2 noised, 3 JPEG
    x[g == 1] = x[g == 1][..., ::-1]
    x[g == 2] = _noisy(x[g == 2], cfg.noise_std, rng)
    x[g == 3] = np.stack([_jpeg(im, cfg.jpeg_quality) for im in x[g == 3]]) if (g == 3).any() else x[g == 3]
    memorizer = Images(x, mem.y, [f"memorizer-{i}" for i in range(n)])
    xs, ys = [], []
    for c in np.unique(perfect.y):
        pool = np.flatnonzero(real.train.y == c)
        if len(pool) == 0:
            continue
        src = rng.choice(pool, min(cfg.collapsed_sources, len(pool)), replace=False)
        k = int((perfect.y == c).sum())
        xs.append(_noisy(real.train.x[rng.choice(src, k)], cfg.noise_std, rng))
        ys.append(np.full(k, c))
    collapsed = Images(np.concatenate(xs), np.concatenate(ys), [f"collapsed-{i}" for i in range(sum(map(len, ys)))])
    return {"perfect": perfect, "memorizer": memorizer, "collapsed": collapsed}, \
        RealSplits(real.train, real.val, real.heldout.take(ref_idx))


class _SameRealFeatures:
    """The domain extractor, remembering its results for the real splits' arrays (the same objects for
    all three generators), so calibration extracts real features once."""

    def __init__(self, domain):
        self.domain, self.dim, self.val_accuracy = domain, domain.dim, domain.val_accuracy
        self._memo: dict[tuple[str, int], tuple[Any, Any]] = {}  # (kind, id) → (array kept alive, result)

    def _get(self, kind: str, x: np.ndarray, fn):
        key = (kind, id(x))
        if key not in self._memo:
            self._memo[key] = (x, fn(x))
        return self._memo[key][1]

    def features_and_probs(self, x):
        return self._get("fp", x, self.domain.features_and_probs)

    def __call__(self, x):
        return self.features_and_probs(x)[0]

    def mirrored(self, x):
        return self._get("mirror", x, self.domain.mirrored)


def calibration_tstr(gens: dict[str, Images], real: RealSplits, num_classes: int, ecfg: EvalConfig, seed: int,
                     device: str) -> dict[str, Any]:
    """Train on each generator's images and on as many real training images of the same class mix
    (equal steps, checkpoint chosen on real val), test on the held-out half: a perfect generator's
    accuracy should match real at equal size, within the test set's noise."""
    import torch

    from meddiff.evaluate.tstr import equal_size_real, run_setting

    val = (torch.from_numpy(real.val.x), torch.as_tensor(real.val.y))
    test_x, test_y = torch.from_numpy(real.heldout.x), torch.as_tensor(real.heldout.y)

    def acc(imgs: Images, name: str) -> dict[str, Any]:
        r, _ = run_setting(name, torch.from_numpy(imgs.x), torch.as_tensor(imgs.y), test_x, test_y, num_classes,
                           ecfg.tstr_steps, val, ecfg.tstr_protocol, ecfg.seed, device)
        return {"accuracy": r.accuracy, "ci": r.ci, "auc": r.auc, "n_train": r.n_train}

    base = acc(equal_size_real(real.train, gens["perfect"].y, seed), "real (equal size)")
    out = {}
    for name, imgs in gens.items():
        r = acc(imgs, name)
        out[name] = {**r, "real_accuracy": base["accuracy"], "difference": r["accuracy"] - base["accuracy"]}
    return {"protocol": ecfg.tstr_protocol, "steps": ecfg.tstr_steps, "n_test": len(test_y),
            "test": "the held-out half of the test split", "real_equal_size": base, "generators": out}


def calibration_uri(dataset_uri: str, cfg: CalibrationConfig, root: str | None = None) -> str:
    """``<root>/calibration/<dataset>/<version>/<config hash>`` (root: the dataset's storage root)."""
    parts = dataset_uri.rstrip("/").split("/")
    if root is None:  # beside the dataset's own folder when it is outside a storage root
        root = storage.dataset_root(dataset_uri) or "/".join(parts[:-1])
    return storage.join(root, "calibration", parts[-2], parts[-1], content_hash(cfg)[:16])


def calibrate(dataset_uri: str, cfg: CalibrationConfig | None = None, root: str | None = None,
              force: bool = False, progress: Progress | None = None) -> tuple[str, dict[str, Any]]:
    """Score the three reference generators; returns (calibration.json URI, its content). ``progress``
    counts the stages (features, each generator, TSTR), each told as it starts."""
    cfg = (cfg or CalibrationConfig()).check()
    ecfg = replace(cfg.eval, umap_points=0).check()  # calibration.html draws no per-generator UMAP
    out = calibration_uri(dataset_uri, cfg, root)
    json_uri = storage.join(out, "calibration.json")
    if not force and storage.exists(json_uri) and storage.exists(storage.join(out, "calibration.html")):
        old = storage.read_json(json_uri)
        if old.get("report_schema_version") == REPORT_SCHEMA_VERSION:  # else judged by older rules: recompute
            tell(progress, f"reusing {json_uri}: the same calibration was made before (--force to redo)")
            return json_uri, old
    configure_threads()  # CPU threads that fit the machine now, as evaluate's (meddiff.threads)
    stages = ["features: the domain classifier (trained once per dataset version, cached after)",
              *(f"scoring the {g} generator" for g in GENERATORS), *(["TSTR classifiers"] if cfg.tstr else [])]

    def stage(i: int) -> None:  # stage i starts (i == len(stages): all done)
        if progress is not None:
            progress(i, len(stages))
        if i < len(stages):
            tell(progress, f"{stages[i]} ({i + 1} of {len(stages)})")

    stage(0)
    dataset = open_dataset(dataset_uri)
    device = str(resolve_device(ecfg.device))
    gens, real = reference_generators(load_real(dataset, ecfg.heldout_split), cfg)
    domain = _SameRealFeatures(load_or_train_domain(dataset, ecfg.domain, device, ecfg.cache_root))
    inception = load_inception(device) if "inception" in ecfg.features else None
    real_inception = inception and real_features(inception, dataset.uri, ecfg.cache_root)  # real sets: cached
    results = {}
    for i, (name, imgs) in enumerate(gens.items(), 1):
        stage(i)
        body = evaluate_images(imgs, real, ecfg, dataset.class_names, domain, inception,
                               real_inception=real_inception).body
        results[name] = {"verdict": body["verdict"]["verdict"], "sentence": body["verdict"]["sentence"],
                         "n": len(imgs), "headline": body["headline"], "metrics": body["metrics"],
                         "flagged_fraction": body["memorization"]["flagged"] / max(len(imgs), 1)}
    if cfg.tstr:
        stage(len(stages) - 1)
    tstr = calibration_tstr(gens, real, dataset.num_classes, ecfg, cfg.seed, device) if cfg.tstr else None
    stage(len(stages))
    for name in GENERATORS:
        results[name]["tstr"] = tstr and tstr["generators"][name]
    record = make_record("calibration", cfg, {"dataset_uri": dataset.uri, "dataset_version": dataset.version},
                         device=device, report_schema_version=REPORT_SCHEMA_VERSION, **results, tstr=tstr,
                         references={"heldout": f"half of the {ecfg.heldout_split} split ({len(real.heldout)} images)",
                                     "perfect": f"the other half ({len(gens['perfect'])} images)"})
    storage.write_json(json_uri, record)
    storage.write_bytes(storage.join(out, "calibration.html"), render_calibration(record))
    return json_uri, storage.read_json(json_uri)


def calibration_table(record: dict[str, Any]) -> list[tuple[str, ...]]:
    """(metric, perfect, memorizer, collapsed) rows: value and verdict of every headline metric."""
    rows_by = {g: {r[0]: (r[1].split(" [")[0], r[4]) for r in headline_rows(record[g])} for g in GENERATORS}
    names = list(rows_by["perfect"])
    rows = [("overall verdict", *(record[g]["verdict"] for g in GENERATORS))]  # flagged: the headline's row
    for m in names:
        rows.append((m, *(" ".join(rows_by[g].get(m, ("—", ""))).strip() for g in GENERATORS)))
    if record.get("tstr"):
        t = record["tstr"]
        rows.append((f"TSTR accuracy (Δ vs real at equal size, {accuracy_ci(t['real_equal_size'])})",
                     *(f"{accuracy_ci(t['generators'][g])} ({t['generators'][g]['difference']:+.3f})"
                       for g in GENERATORS)))
    return rows


def accuracy_ci(r: dict[str, Any]) -> str:
    """0.833 [0.735, 0.900]: a TSTR accuracy with its Wilson interval (on tens of test images it is wide)."""
    return f"{r['accuracy']:.3f}" + (f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r.get("ci") else "")


def render_calibration(record: dict[str, Any]) -> bytes:
    head = "".join(f"<th>{h}</th>" for h in ("metric", *GENERATORS))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in calibration_table(record))
    sentences = "".join(f"<li><b>{g}</b>: {html.escape(record[g]['sentence'])}</li>" for g in GENERATORS)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>meddiff calibration</title></head><body>"
            f"<h1>Calibration of the evaluation on <code>{html.escape(record['inputs']['dataset_uri'])}</code></h1>"
            f"<ul>{sentences}</ul><table border=1 cellpadding=3><tr>{head}</tr>{body}</table>"
            f"<p>Held-out reference: {html.escape(record['references']['heldout'])}; perfect generator: "
            f"{html.escape(record['references']['perfect'])}.</p></body></html>").encode()
