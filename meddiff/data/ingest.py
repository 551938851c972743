"""Ingest: a source (MedMNIST, Kaggle, zip, folder) → a versioned, validated WebDataset copy.

Layout: ``<root>/datasets/<name>/<version>/{train,val,test}-%06d.tar``, ``index.parquet``,
``dataset.json``. The version is a content hash of the source checksums and the resolved
ingest config, so a repeated ingest finds its version and does no work.

Each split is written in a seeded random order (``shuffle_seed``, on the card), never class by
class: a reader that streams shards with a modest shuffle buffer gets i.i.d.-like batches.
Inputs deeper than 8 bits are rescaled by a recorded rule (:class:`meddiff.data.images.Intensity`).
A zip/folder/Kaggle dataset is grey (1 channel) unless one of its images holds colour (``colour``): a
radiograph saved as an RGB JPEG or a palette PNG is grey. The card's ``pixels`` says how the channels
were decided and what else reading did (:mod:`meddiff.data.pixel_survey`); DICOM is read as a viewer
shows it (:mod:`meddiff.data.dicom`). Which split each image goes to: :mod:`meddiff.data.splits`.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, get_args

import numpy as np
import pyarrow as pa
from PIL import Image
import pyarrow.parquet as pq

from meddiff import storage
from meddiff.locks import artifact_lock, tell_waiting
from meddiff.errors import Interrupted, SourceError, check_seed
from meddiff.data import dicom
from meddiff.data.images import GREY_TOLERANCE, Intensity, bits_for, encode_png, load_image, resize_center_crop, to_pil
from meddiff.data.pixel_survey import Colour, Frames, PixelSurvey
from meddiff.data.splits import assign_splits
from meddiff.records import content_hash, make_record, sha256_bytes
from meddiff.data.shards import ShardSink, encode_sample
from meddiff.data.sources import (SPLITS, RawSample, SourceData, SplitRule, check_name, dataset_name,
                                  parse_source)
from meddiff.data.sources.label_table import LabelSpec

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class IngestConfig:
    source: str  # medmnist:<flag> | kaggle:<owner>/<slug> | zip:<path> | folder:<path>
    size: int | None = None  # output side in px; None = 28 for MedMNIST, 64 for images
    name: str | None = None  # dataset name; None = derived from the source
    classes: str | None = None  # zip/folder: "glob[=name],..." selecting/renaming class folders
    split_seed: int = 0  # seed of the stratified train/val/test split (zip/folder)
    val_frac: float = 0.1  # validation fraction per class (zip/folder)
    test_frac: float = 0.2  # test fraction per class (zip/folder)
    shard_size: int = 10_000  # max samples per shard
    medmnist_root: str | None = None  # folder with already-downloaded MedMNIST npz (no download)
    shuffle_seed: int = 0  # seed of the random order each split is written in (shuffled at rest)
    bit_depth: int | None = None  # >8-bit integer inputs: sensor bits (None = detected from the dataset's max)
    window: str | None = None  # "lo,hi" percentiles: per-image window to 8 bits instead of the bit depth
    colour: Colour = "auto"  # zip/folder/kaggle: auto = 1 channel unless an image holds colour; grey / rgb force
    # zip/folder/kaggle: auto = class folders inside published split folders (train/, test/, val/) keep their
    # split, a missing val or test carved from each class's train images; random = one stratified split of all
    splits: SplitRule = "auto"
    labels: str | None = None  # zip/folder/kaggle: a label CSV (in the source, or on disk); None = class folders
    id_column: str = "image"  # --labels: the column naming each image (its path inside the source, or file stem)
    label_column: str = "label"  # --labels: the column holding each image's class
    group_column: str | None = None  # --labels: a patient/lesion id column; a group's images share one split
    # zip/folder/kaggle: a regex on each file's path in the source whose match (its first group, if it has one)
    # is the patient id, e.g. 'person\d+'; a group's images share one split. None = no groups
    group_pattern: str | None = None
    frames: Frames = "first"  # multi-frame files: first = a TIFF/GIF's first page (a DICOM is skipped); all =
    # every frame an image, a file's frames in one split

    def label_spec(self) -> LabelSpec | None:
        return None if self.labels is None else LabelSpec(self.labels, self.id_column, self.label_column,
                                                          self.group_column)

    def intensity(self) -> Intensity:
        """The rule for >8-bit/float inputs (``bit_depth`` of None is filled in by the ingest's pre-pass)."""
        if self.window:
            lo, hi = (float(v) for v in self.window.split(","))
            return Intensity(window=(lo, hi))
        return Intensity(bits=self.bit_depth)

    def check(self) -> "IngestConfig":
        check_seed(self.split_seed, "--split-seed")
        check_seed(self.shuffle_seed, "--shuffle-seed")
        ref = parse_source(self.source)
        if self.size is not None and not 8 <= self.size <= 1024:
            raise SourceError(f"--size must be between 8 and 1024 px, got {self.size}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise SourceError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")
        if self.shard_size < 1:
            raise SourceError("--shard-size must be positive")
        if self.name is not None:
            check_name(self.name)  # refused up front, before any download
        if self.medmnist_root and ref.kind != "medmnist":
            raise SourceError("--medmnist-root applies to medmnist: sources only")
        if self.colour not in get_args(Colour):
            raise SourceError(f"--colour must be one of {', '.join(get_args(Colour))}, got {self.colour!r}")
        if self.colour != "auto" and ref.kind == "medmnist":
            raise SourceError("--colour applies to zip:, folder: and kaggle: sources; a MedMNIST dataset keeps its "
                              "published channels (BloodMNIST 3, BreastMNIST 1)")
        if self.splits not in get_args(SplitRule):
            raise SourceError(f"--splits must be one of {', '.join(get_args(SplitRule))}, got {self.splits!r}")
        if self.splits != "auto" and ref.kind == "medmnist":
            raise SourceError("--splits applies to zip:, folder: and kaggle: sources; MedMNIST keeps its official "
                              "splits")
        if self.labels is None and (self.id_column, self.label_column, self.group_column) != ("image", "label", None):
            raise SourceError("--id-column, --label-column and --group-column apply with --labels (a CSV of labels)")
        if self.labels is not None and ref.kind == "medmnist":
            raise SourceError("--labels applies to zip:, folder: and kaggle: sources; MedMNIST carries its labels")
        for option, column in (("--id-column", self.id_column), ("--label-column", self.label_column),
                               ("--group-column", self.group_column)):
            if column is not None and not column.strip():
                raise SourceError(f"{option} must name a column, got {column!r}")
        if self.group_pattern is not None:
            if ref.kind == "medmnist":
                raise SourceError("--group-pattern applies to zip:, folder: and kaggle: sources")
            if self.group_column is not None:
                raise SourceError("give --group-column or --group-pattern, not both")
            try:
                re.compile(self.group_pattern)
            except re.error as e:
                raise SourceError(f"--group-pattern {self.group_pattern!r} is not a regular expression ({e})") from None
        if self.frames not in get_args(Frames):
            raise SourceError(f"--frames must be one of {', '.join(get_args(Frames))}, got {self.frames!r}")
        if self.frames != "first" and ref.kind == "medmnist":
            raise SourceError("--frames applies to zip:, folder: and kaggle: sources")
        if self.bit_depth is not None and not 8 <= self.bit_depth <= 32:
            raise SourceError(f"--bit-depth must be between 8 and 32, got {self.bit_depth}")
        if self.window is not None:
            parts = self.window.split(",")
            try:
                lo, hi = (float(v) for v in parts)
            except ValueError:
                lo = hi = -1.0
            if len(parts) != 2 or not 0 <= lo < hi <= 100:
                raise SourceError(f"--window must be 'lo,hi' percentiles with 0 <= lo < hi <= 100, got {self.window!r}")
        return self

    def resolved(self) -> "IngestConfig":
        kind = parse_source(self.source).kind
        return replace(self, size=self.size or (28 if kind == "medmnist" else 64))

    def identity(self) -> dict:
        """What determines the content of a version (locations excluded)."""
        c = self.resolved()
        return {"source": c.source if parse_source(c.source).kind in ("medmnist", "kaggle") else
                parse_source(c.source).kind, "size": c.size, "classes": c.classes,
                "split_seed": c.split_seed, "val_frac": c.val_frac, "test_frac": c.test_frac,
                "shard_size": c.shard_size, "order": "shuffled", "shuffle_seed": c.shuffle_seed,
                "bit_depth": c.bit_depth, "window": c.window,
                # zip/folder/kaggle: byte-identical files are kept once (an official split is left as published)
                **({} if parse_source(c.source).kind == "medmnist" else
                   {"duplicates": "exact copies dropped", "colour": f"{c.colour}: grey within {GREY_TOLERANCE}",
                    "orientation": "EXIF applied"}),
                **({"labels": {"table": c.labels, "id_column": c.id_column, "label_column": c.label_column,
                               "group_column": c.group_column}} if c.labels else {}),
                **({"group_pattern": c.group_pattern} if c.group_pattern else {}),
                **({"frames": c.frames} if c.frames != "first" else {})}


@dataclass(frozen=True)
class IngestResult:
    uri: str  # the dataset version's location: pass it to train/evaluate
    card: dict
    existed: bool  # True when the version was already complete (no work done)


def load_source(cfg: IngestConfig, root: str, progress: Progress | None = None) -> SourceData:
    """Fetch (download if needed) and list the source's samples. A download another process is making is
    waited for (``progress`` is told), then reused."""
    ref = parse_source(cfg.source)
    # downloads are kept under the local root's raw/ (or the user cache for remote roots)
    raw = (Path.home() / ".cache" / "meddiff" if storage.is_remote(root) else Path(root)) / "raw"
    if ref.kind == "medmnist":
        from meddiff.data.sources import medmnist_source

        med_root = Path(cfg.medmnist_root).expanduser() if cfg.medmnist_root else None
        on_wait = tell_waiting(progress, f"{cfg.source} (size {cfg.size})", doing="downloading or unpacking")
        return medmnist_source.load(ref.target, cfg.size, med_root, raw / "medmnist", on_wait)
    from meddiff.data.sources import archive_source

    if ref.kind == "kaggle":
        from meddiff.data.sources import kaggle_source

        on_wait = tell_waiting(progress, cfg.source, doing="downloading")
        zip_path = kaggle_source.download(ref.target, raw / "kaggle" / ref.target, on_wait)
        return archive_source.load_zip(zip_path, cfg.classes, ref.default_name, cfg.label_spec())
    if ref.kind == "zip":
        return archive_source.load_zip(Path(ref.target).expanduser(), cfg.classes, ref.default_name, cfg.label_spec())
    return archive_source.load_folder(Path(ref.target).expanduser(), cfg.classes, ref.default_name, cfg.label_spec())


def _prepare(sample: RawSample, size: int, channels: int | None, intensity: Intensity,
             data: bytes | None = None) -> bytes:
    """Decode/resize one input (``data``: its file's bytes, when already read) to PNG bytes; raises on an
    unreadable image."""
    if isinstance(sample.payload, np.ndarray):
        img = to_pil(sample.payload)
    else:
        img = load_image(sample.data() if data is None else data, channels, intensity, sample.frame)
    return encode_png(resize_center_crop(img, size))


class FramePNGs:
    """The frames of multi-frame files (--frames all), all prepared when a file's first frame comes up, so the
    file is read once, not once per frame (a 300-frame clip read 300 times from a zip); kept as PNG files in
    ``folder`` until their turn in the shuffled order. ``frames``: path → frame count."""

    def __init__(self, folder: Path, frames: dict[str, int], prepare: Callable[[RawSample, bytes], bytes]):
        self.folder, self.frames, self.prepare = folder, frames, prepare
        self.done: dict[str, Path] = {}

    def png(self, sample: RawSample) -> bytes:
        """One frame's PNG; raises (ValueError with the decoder's words) for a frame that failed."""
        path = sample.source_id.rpartition("#")[0]
        if path not in self.done:
            self.done[path] = out = self.folder / str(len(self.done))
            out.mkdir(parents=True)
            data = sample.data()
            for k in range(self.frames[path]):
                try:
                    (out / f"{k}.png").write_bytes(self.prepare(replace(sample, frame=k), data))
                except Image.DecompressionBombError:
                    raise
                except Exception as e:  # noqa: BLE001 - that frame is skipped with its reason
                    (out / f"{k}.error").write_text(str(e))
        png = self.done[path] / f"{sample.frame}.png"
        if not png.exists():
            raise ValueError((self.done[path] / f"{sample.frame}.error").read_text())
        data = png.read_bytes()
        png.unlink()
        return data


def ingest(config: IngestConfig, root: str | None = None, progress: Progress | None = None) -> IngestResult:
    """Build (or find) the dataset version for ``config`` under the storage root."""
    cfg = config.check().resolved()
    root = storage.storage_root(root)
    t0 = time.time()
    src = load_source(cfg, root, progress)
    name = dataset_name(cfg.name, src.name, cfg.source)
    published = {"split_folders": src.split_folders} if src.split_folders and cfg.splits == "auto" else {}
    version = content_hash({"checksums": src.checksums, "config": cfg.identity(), **published})
    uri = storage.join(root, "datasets", name, version)
    try:
        # a concurrent ingest of the same version waits here, then finds it
        with artifact_lock(uri, tell_waiting(progress, uri)):
            return _build_version(cfg, src, root, name, version, uri, t0, progress)
    except KeyboardInterrupt:  # Ctrl-C: the private staging folder is removed, dataset.json is published last
        raise Interrupted(f"stopped before {uri} was published (its staging folder is removed): re-run the same "
                          "command to ingest it") from None


def _build_version(cfg: IngestConfig, src: SourceData, root: str, name: str, version: str, uri: str, t0: float,
                   progress: Progress | None) -> IngestResult:
    if storage.exists(storage.join(uri, "dataset.json")):
        from meddiff.data.shards import open_dataset

        return IngestResult(uri, open_dataset(uri).card, existed=True)

    channels, intensity, pixels, frames = _inspect(src, cfg)
    if frames:  # --frames all: each frame of a multi-frame file is a sample, the file's frames one group
        src = replace(src, samples=_frame_samples(src.samples, frames))
    splits, split_rule = assign_splits(src, cfg)

    staging = storage.local_staging(root, f"dataset-{name}-{version}")
    try:
        with storage.write_faults(staging):
            rows, skipped, shards = _write_splits(src, splits, cfg, staging, progress, channels, intensity, frames)
            skipped = src.skipped + skipped
            if not rows["key"]:
                raise SourceError(f"no readable images in {cfg.source}; skipped: {skipped[:5]}")
            table = pa.table(rows)
            pq.write_table(table, staging / "index.parquet")
            card = _card(cfg, src, name, version, uri, table, skipped, shards, time.time() - t0, intensity, pixels,
                         split_rule)
            storage.write_json(str(staging / "dataset.json"), card)
            storage.publish_dir(staging, uri, last=("dataset.json",))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return IngestResult(uri, card, existed=False)


def _frame_samples(samples: list[RawSample], frames: dict[str, int]) -> list[RawSample]:
    """Each multi-frame file's sample → one per frame, ``<path>#<k>`` (``frames``: path → its frame count)."""
    return [replace(s, source_id=f"{s.source_id}#{k}", frame=k) if s.source_id in frames else s
            for s in samples for k in range(frames.get(s.source_id, 1))]


def _bomb(source_id: str, e: Exception) -> SourceError:
    return SourceError(f"{source_id} is a decompression bomb ({e}); remove it from the source")


def _inspect(src: SourceData, cfg: IngestConfig
             ) -> tuple[int | None, Intensity | None, dict | None, dict[str, int]]:
    """One pass over the files: the channel count (by ``cfg.colour``), the intensity rule (None when no input
    is deeper than 8 bits; its bit depth, when not given, from the largest >8-bit integer value), the card's
    ``pixels`` record, and (``--frames all``) the frame count of each multi-frame file."""
    import io

    rule = cfg.intensity()
    if not src.samples or isinstance(src.samples[0].payload, np.ndarray):
        return None, None, None, {}  # MedMNIST arrays: uint8, channels kept
    survey = PixelSurvey(cfg.colour, find_bits=rule.bits is None and not rule.window, frames=cfg.frames)
    for s in src.samples:
        try:
            data = s.data()
            if dicom.is_dicom(data):
                survey.see_dicom(s.source_id, dicom.info(data, frames=cfg.frames == "all"))
                continue
            with Image.open(io.BytesIO(data)) as im:
                survey.see(s.source_id, im)
        except Image.DecompressionBombError as e:
            raise _bomb(s.source_id, e) from None
        except Exception:  # noqa: BLE001 - bad files are reported when they are decoded
            continue
    if survey.high_max >= 0:
        rule = Intensity(bits=bits_for(survey.high_max))
    frames = survey.frame_counts if cfg.frames == "all" else {}
    return survey.channels, rule if survey.deep else None, survey.record(), frames


def _write_splits(src: SourceData, splits: np.ndarray, cfg: IngestConfig, staging: Path,
                  progress: Progress | None, channels: int | None, intensity: Intensity | None,
                  frames: dict[str, int] | None = None):
    """Every sample decoded, resized and written to its split's shards in the seeded shuffled order;
    ``frames`` (path → count): multi-frame files whose frames are samples (--frames all)."""
    rule = intensity or cfg.intensity()  # --window reaches DICOM too
    cache = FramePNGs(staging / ".frames", frames or {},
                      lambda s, data: _prepare(s, cfg.size, channels, rule, data))
    try:
        return _write_shards(src, splits, cfg, staging, progress, channels, rule, cache)
    finally:
        shutil.rmtree(staging / ".frames", ignore_errors=True)  # never published


def _write_shards(src: SourceData, splits: np.ndarray, cfg: IngestConfig, staging: Path, progress: Progress | None,
                  channels: int | None, rule: Intensity, cache: FramePNGs):
    cols = ("key", "split", "label", "label_name", "shard", "source_id", "height", "width", "channels", "sha256")
    rows: dict[str, list] = {c: [] for c in cols}
    skipped: list[dict[str, str]] = []
    shards: dict[str, list[str]] = {}
    total, done = len(src.samples), 0
    order = np.random.default_rng(cfg.shuffle_seed).permutation(total)  # shuffled at rest, never class by class
    for split in SPLITS:
        members = [int(i) for i in order if splits[i] == split]
        sink = ShardSink(staging, split, cfg.shard_size)
        n = 0
        with sink.aborting():
            for i in members:
                s = src.samples[i]
                done += 1
                try:
                    png = cache.png(s) if s.frame is not None else _prepare(s, cfg.size, channels, rule)
                except Image.DecompressionBombError as e:
                    raise _bomb(s.source_id, e) from None
                except Exception as e:  # noqa: BLE001 - one bad image is skipped, not fatal
                    skipped.append({"source_id": s.source_id, "reason": f"unreadable image: {e}"})
                    continue
                key = f"{split}-{n:06d}"
                n += 1
                name = src.class_names[s.label]
                shard = sink.write(encode_sample(key, png, s.label, {"label": s.label, "label_name": name,
                                                                      "source_id": s.source_id, "split": split}))
                c = 1 if png[25] in (0, 4) else 3  # PNG IHDR colour type: 0 = gray, 2 = RGB
                for col, v in zip(cols, (key, split, s.label, name, shard, s.source_id, cfg.size, cfg.size, c,
                                         sha256_bytes(png))):
                    rows[col].append(v)
                if progress and (done % 500 == 0 or done == total):
                    progress(done, total)
        written = sink.close()
        if n == 0:  # ShardWriter opened an empty first shard
            for f in staging.glob(f"{split}-*.tar"):
                f.unlink()
            written = []
        shards[split] = written
    if progress:
        progress(total, total)
    return rows, skipped, shards


def _card(cfg, src: SourceData, name, version, uri, table: pa.Table, skipped, shards, seconds,
          intensity: Intensity | None, pixels: dict | None, split_rule: dict) -> dict:
    df = table.select(["split", "label"]).to_pandas()
    counts = {split: {c: int(((df.split == split) & (df.label == i)).sum()) for i, c in enumerate(src.class_names)}
              for split in SPLITS}
    channels = sorted(set(table.column("channels").to_pylist()))
    return make_record(
        "dataset", cfg, inputs={"source_checksums": src.checksums},
        name=name, version=version, uri=uri, source=cfg.source, license=src.license,
        class_names=src.class_names, num_classes=len(src.class_names),
        counts=counts, totals={s: sum(counts[s].values()) for s in SPLITS},
        image_size=cfg.size, channels=channels[0] if len(channels) == 1 else max(channels),
        shards=shards, skipped=skipped, num_skipped=len(skipped),
        official_splits=src.has_official_splits, splits=split_rule,
        **({"labels": src.label_table} if src.label_table else {}), ingest_seconds=round(seconds, 2),
        order={"shuffled": True, "shuffle_seed": cfg.shuffle_seed,
               "note": "each split is written in a seeded random order (not class by class)"},
        intensity=intensity.describe() if intensity else {"rule": "none: every input is 8-bit" + (
            " (DICOM aside: see pixels.dicom)" if (pixels or {}).get("dicom") else "")},
        pixels=pixels or {"colour": "as published"},
        duplicates=_duplicates(table, skipped, src.has_official_splits),
    )


def _duplicates(table: pa.Table, skipped: list[dict[str, str]], official: bool) -> dict:
    """Byte-identical stored images: groups, and how many span splits (a held-out image also in train)."""
    df = table.select(["sha256", "split"]).to_pandas()
    splits = df.groupby("sha256")["split"].agg(["size", "nunique"])
    return {"identical_groups": int((splits["size"] > 1).sum()),
            "across_splits": int((splits["nunique"] > 1).sum()),
            "dropped_copies": sum(s["reason"].startswith("exact duplicate of") for s in skipped),
            "rule": ("official splits kept as published (copies across them are counted, not removed)" if official
                     else "byte-identical source files kept once; stored images identical after resizing counted")}
