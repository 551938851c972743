"""WebDataset shards: the one on-disk format for real dataset versions and synthetic cohorts.

A sample is ``<key>.png`` (lossless, native channel count) + ``<key>.cls`` (class id as text)
+ ``<key>.json`` (label name, source id, ...). Keys contain no dots. Shards are deterministic:
fixed sample order, fixed tar mtime/owner, so the same input gives byte-identical files.

Readers work on local paths and ``s3://`` URLs alike (streams are opened through fsspec).
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:  # webdataset imports torch (1.4 s): it loads only where shards are written or streamed
    import webdataset as wds

from meddiff import storage
from meddiff.errors import ArtifactError
from meddiff.data.images import decode_png

TAR_MTIME = 0.0  # fixed tar header mtime → byte-identical shards across runs
SHARD_PATTERN = "{prefix}-%06d.tar"


def encode_sample(key: str, png: bytes, label: int, meta: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample dict with every field already encoded to bytes."""
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain dots")
    return {
        "__key__": key,
        "png": png,
        "cls": str(int(label)).encode(),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


class ShardSink:
    """Write samples into ``<dir>/<prefix>-%06d.tar`` with ``webdataset.ShardWriter``.

    Records which shard each key went to (``placements``) for the index/manifest.
    """

    def __init__(self, directory: Path, prefix: str, maxcount: int, start_shard: int = 0):
        import webdataset as wds

        directory.mkdir(parents=True, exist_ok=True)
        self.pattern = str(directory / SHARD_PATTERN.format(prefix=prefix))
        self.writer = wds.ShardWriter(self.pattern, maxcount=maxcount, start_shard=start_shard,
                                      verbose=0, encoder=False, mtime=TAR_MTIME)
        self.placements: dict[str, str] = {}

    def write(self, sample: dict[str, Any]) -> str:
        self.writer.write(sample)
        shard = Path(self.writer.fname).name
        self.placements[sample["__key__"]] = shard
        return shard

    def close(self) -> list[str]:
        self.writer.close()
        return sorted(set(self.placements.values()))

    @contextmanager
    def aborting(self) -> Iterator[None]:
        """On an error inside, close the writer quietly (its files are staging debris the caller removes)."""
        try:
            yield
        except BaseException:
            with suppress(Exception):
                self.writer.close()
            raise


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> None:
    """Write one shard atomically (temp file + rename); used for chunked, resumable writers."""
    import webdataset as wds

    with storage.atomic_file(path) as f, wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as tw:
        for s in samples:
            tw.write(s)


def iter_tar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in an uncompressed tar held in memory.

    A direct walk over the 512-byte ustar headers: several times faster than ``tarfile`` for
    shards of many small PNGs. pax/GNU long-name headers are handled; other types skipped.
    """
    pos, n, long_name = 0, len(data), None
    while pos + 512 <= n:
        header = data[pos:pos + 512]
        if header.count(0) == 512:  # end-of-archive block
            return
        size = int(header[124:136].rstrip(b"\0 ").strip() or b"0", 8)
        kind = header[156:157]
        body = data[pos + 512:pos + 512 + size]
        pos += 512 + (size + 511) // 512 * 512
        if kind == b"L":  # GNU long name for the next member
            long_name = body.rstrip(b"\0").decode()
            continue
        if kind == b"x":  # pax header: path=...
            for line in body.decode().splitlines():
                if " path=" in line:
                    long_name = line.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue
        name = long_name or header[:100].rstrip(b"\0").decode()
        prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
        long_name = None
        yield (f"{prefix}/{name}" if prefix and not name.startswith(prefix) else name), body


def iter_shard(uri: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard as raw dicts {"__key__", "png", "cls", "json", "__url__"} (bytes values)."""
    data = storage.read_bytes(uri)
    current: dict[str, Any] = {}
    for name, body in iter_tar_members(data):
        key, _, ext = name.rpartition("/")[2].partition(".")
        if current and current["__key__"] != key:
            yield current
            current = {}
        if not current:
            current = {"__key__": key, "__url__": uri}
        current[ext] = body
    if current:
        yield current


def decode_sample(sample: dict[str, Any]) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Raw sample → (uint8 C×H×W image, class id, metadata)."""
    return decode_png(sample["png"]), int(sample["cls"]), json.loads(sample["json"])


@dataclass(frozen=True)
class DatasetVersion:
    """A published dataset version: ``<root>/datasets/<name>/<version>/``."""

    uri: str

    @cached_property
    def card(self) -> dict[str, Any]:
        return read_card(self.uri, "dataset.json")

    @property
    def class_names(self) -> list[str]:
        return list(self.card["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.card["class_names"])

    @property
    def channels(self) -> int:
        return int(self.card["channels"])

    @property
    def image_size(self) -> int:
        return int(self.card["image_size"])

    @property
    def version(self) -> str:
        return str(self.card["version"])

    def shard_uris(self, split: str) -> list[str]:
        return [storage.join(self.uri, s) for s in self.card["shards"][split]]

    def index(self):
        """The per-sample index as a pandas DataFrame."""
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(storage.join(self.uri, "index.parquet"))
        with fs.open(path, "rb") as f:
            return pq.read_table(f).to_pandas()

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Eager loader for small sets: (uint8 N×C×H×W, int64 N) in index order."""
        return load_shards(self.shard_uris(split))

    def pipeline(self, split: str, **kw: Any) -> wds.DataPipeline:
        return image_pipeline(self.shard_uris(split), **kw)


def empty_splits(card: dict[str, Any]) -> list[str]:
    """A warning for each split some class has no image in (a rare class of a small folder dataset: 4 images
    at --val-frac 0.1 round to 0 val images), saying what evaluation or training then lacks."""
    what = {"val": "evaluation has no real baseline for them: their synthetic images are left out of the overall "
                   "set metrics and their class is not judged (a larger --val-frac, or more images of them)",
            "test": "evaluation's held-out reference lacks them: their synthetic images are left out of the overall "
                    "set metrics against it (a larger --test-frac, or more images of them)",
            "train": "a model trained on this version never sees them"}
    out = []
    for split, consequence in what.items():
        lack = [c for c, n in card["counts"].get(split, {}).items() if n == 0]
        if lack and card["totals"].get(split):  # a split left empty on purpose (--val-frac 0) is not a gap
            out.append(f"no {split} images of {', '.join(lack)}: {consequence}")
    return out


def split_summary(card: dict[str, Any]) -> str | None:
    """How the splits were chosen, in words (None on versions ingested before 2026-12-08, which lack it)."""
    rule = card.get("splits")
    if rule is None:
        return None
    def where(folders: dict[str, list[str]]) -> str:
        return "; ".join(f"{split}: {', '.join(fs)}" for split, fs in folders.items())

    grouped = ""
    if g := rule.get("groups"):
        n = g["images_without_group"]
        grouped = f"; {g['rule']} ({g['groups']} groups" + (
            "" if not n else "; 1 image without one: a group of its own" if n == 1 else
            f"; {n} images without one: each a group of its own") + ")"
    if pooled := rule.get("folders_pooled"):
        return f"{rule['rule']}, the published split folders pooled by --splits random ({where(pooled)}){grouped}"
    if kept := rule.get("folders"):
        return (f"{rule['rule']} ({where(kept)})" + "".join(f"; {c}" for c in rule.get("carved", [])) + grouped
                + "; --splits random pools and re-splits them")
    return rule["rule"] + grouped


def label_summary(card: dict[str, Any]) -> str | None:
    """Where the labels came from when a table gave them (--labels), in words; else None."""
    t = card.get("labels")
    if not t:
        return None
    text = f"{t['table']} ({t['id_column']} → {t['label_column']})"
    if t["rows_without_image"]:
        n = t["rows_without_image"]
        text += f"; {n} of its {t['rows']} rows {'names' if n == 1 else 'name'} no image in the source"
    if n := t["images_without_row"]:
        text += f"; {n} {'image has' if n == 1 else 'images have'} no row (skipped)"
    return text  # its groups: split_summary


def split_note(card: dict[str, Any]) -> str | None:
    """What ingest tells about the splits: said when the source had published split folders or groups."""
    rule = card.get("splits") or {}
    said = rule.get("folders") or rule.get("folders_pooled") or rule.get("groups")
    return f"splits: {split_summary(card)}" if said else None


# record → (one, many, the command that lists them)
ARTIFACT_KINDS = {"dataset.json": ("dataset version", "dataset versions", "meddiff datasets list"),
                  "model.json": ("model", "models", "meddiff models list"),
                  "cohort.json": ("cohort", "cohorts", "meddiff cohorts list")}


def read_card(uri: str, record: str) -> dict[str, Any]:
    """The record file of a complete artifact, or a clear ArtifactError."""
    card_uri = storage.join(uri, record)
    if not storage.exists(uri):
        raise ArtifactError(f"{uri} does not exist" + _no_bucket(uri))
    if not storage.exists(card_uri):
        for other, (kind, _, _) in ARTIFACT_KINDS.items():
            if other != record and storage.exists(storage.join(uri, other)):
                raise ArtifactError(f"{uri} is a {kind}, not what this command takes (it has {other}, not {record})")
        if held := _held_artifacts(uri):  # e.g. storage/datasets/bloodmnist instead of one of its versions
            raise ArtifactError(_not_one_but_holds(uri, record, held))
        raise ArtifactError(f"{uri} is incomplete (no {record}); re-run the command that makes it")
    try:
        return storage.read_json(card_uri)
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{card_uri} is corrupt: {e}") from e


def _no_bucket(uri: str) -> str:
    """': bucket B does not exist at <endpoint> …' where a remote ``uri``'s bucket is missing (a mistyped bucket,
    or another S3 endpoint), else ''."""
    if not storage.is_remote(uri):
        return ""
    try:
        missing = storage.missing_bucket(uri)
    except Exception:  # noqa: BLE001 - the plain "does not exist" stands
        return ""
    return f": {missing} (check the URI, and AWS_ENDPOINT_URL)" if missing else ""


def _held_artifacts(uri: str, depth: int = 2, most: int = 200) -> dict[str, list[str]]:
    """record → sorted folders holding it, at the first level (of ``depth`` below ``uri``) that has any;
    at most ``most`` folders are looked at per level."""
    level = [uri]
    for _ in range(depth):
        level = [storage.join(u, n) for u in level for n in storage.listdir(u)][:most]
        held = {r: [u for u in level if storage.exists(storage.join(u, r))] for r in ARTIFACT_KINDS}
        if any(held.values()):
            return {r: sorted(us) for r, us in held.items() if us}
    return {}


def _not_one_but_holds(uri: str, record: str, held: dict[str, list[str]]) -> str:
    one, many, lister = ARTIFACT_KINDS.get(record, (record, record, "meddiff --help"))
    if mine := held.get(record):
        which = f"pass it: {mine[0]}" if len(mine) == 1 else f"pass one of them, e.g. {mine[-1]}"
        return (f"{uri} is not a {one} but holds {len(mine)} {one if len(mine) == 1 else many}: {which} "
                f"(`{lister}` lists them)")
    others = " and ".join(ARTIFACT_KINDS[r][1] for r in held)
    return f"{uri} holds {others}, not {many}: pass a {one} (`{lister}` lists them)"


def open_dataset(uri: str) -> DatasetVersion:
    ds = DatasetVersion(storage.absolute(uri))
    if ds.card.get("kind") != "dataset":
        raise ArtifactError(f"{uri} is not a dataset version (kind={ds.card.get('kind')!r})")
    return ds


def load_shards(shard_uris: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode every sample of the given shards: (uint8 N×C×H×W, int64 N)."""
    images, labels = [], []
    for uri in shard_uris:
        for s in iter_shard(uri):
            images.append(decode_png(s["png"]))
            labels.append(int(s["cls"]))
    if not images:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0,), np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _expand_shards(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for shard in src:
        yield from iter_shard(shard["url"])


@lru_cache(maxsize=1)
def _torch_png_decoder():
    """(torch, torchvision.io.decode_png), imported once: torch stays out of ingest's start-up."""
    import warnings

    import torch
    from torchvision.io import decode_png

    # torchvision 0.29 warns on every call that TorchCodec will take these codecs over; decode_png stays
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    return torch, decode_png


def _to_tensor_label(sample: dict[str, Any]):
    torch, decode = _torch_png_decoder()
    img = decode(torch.frombuffer(bytearray(sample["png"]), dtype=torch.uint8))  # C×H×W uint8
    return img.float().div_(255.0), int(sample["cls"])


def image_pipeline(
    shard_uris: list[str],
    *,
    shuffle_shards: bool = False,  # shuffle shard order each epoch (training)
    shuffle_buffer: int = 0,  # sample-level shuffle buffer; 0 = keep order
    seed: int = 0,  # seed for both shuffles
    split_by_node: bool = True,  # each DDP rank reads a disjoint subset of shards
    split_by_worker: bool = True,  # each DataLoader worker reads a disjoint subset
) -> wds.DataPipeline:
    """A WebDataset pipeline of (float32 C×H×W in [0, 1], class id), local or s3 shards.

    With several ranks/workers and fewer shards than readers, splitting is skipped (each
    reader would get nothing otherwise); the training loop then shards by sample instead.
    """
    import webdataset as wds

    stages: list[Any] = [wds.SimpleShardList(list(shard_uris), seed=seed if shuffle_shards else None)]
    if split_by_node:
        stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    stages.append(_expand_shards)
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 1000), rng=random.Random(seed)))
    stages.append(wds.map(_to_tensor_label))
    return wds.DataPipeline(*stages)
