"""Synthetic cohorts on storage: ``<root>/cohorts/<cohort-id>/``.

```
synthetic-000000.tar ...     WebDataset shards, same sample format as real datasets
parts/synthetic-000000.parquet   manifest rows of each committed shard (resume bookkeeping)
manifest.parquet             one row per image (MANIFEST_SCHEMA); quality columns filled by evaluate
cohort.json                  the cohort card (spec, counts, model/dataset URIs), written last
```
A shard is committed when its part file exists (tar written first, both atomically).

Sample ids are class-major (class 0's ids first; an id and the base seed fix its image), but the
shards are written in an interleaved order (:func:`write_order`), so every shard holds the classes
in the cohort's proportions and a stream of the cohort is never class by class.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from meddiff import storage
from meddiff.errors import ArtifactError
from meddiff.records import sha256_bytes
from meddiff.data.shards import iter_shard, read_card

if TYPE_CHECKING:  # pandas loads with the first manifest read: a listing reads cards only
    import pandas as pd

SHARD_PREFIX = "synthetic"
UNKNOWN_CLASS = "(unknown)"  # class_name of an unconditional cohort's images (class_id -1): no class was asked
WRITE_ORDER = "interleaved"  # recorded on cohort.json; cohorts without it were written class-major


def write_order(class_of: np.ndarray, seed: int) -> np.ndarray:
    """Sample ids (N,) in the order they are written: classes spread evenly, with seeded jitter.

    Sample j of a class of n sits at (j + u) / n in [0, 1), u ~ U(0, 1) drawn per sample; ids are
    sorted by that position, so any run of consecutive ids holds every class ∝ its size (± 1).
    class_of: (N,) class id of every sample id.
    """
    n = len(class_of)
    pos = np.empty(n)
    u = np.random.default_rng([seed, 0x5EED]).random(n)
    for c in np.unique(class_of):
        ids = np.flatnonzero(class_of == c)
        pos[ids] = (np.arange(len(ids)) + u[ids]) / len(ids)
    return np.argsort(pos, kind="stable")

MANIFEST_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),  # index in the cohort, 0..N-1; with the base seed it fixes the image
    ("key", pa.string()),  # WebDataset key in the shard
    ("shard", pa.string()),  # shard file name
    ("class_id", pa.int64()),
    ("class_name", pa.string()),
    ("seed", pa.int64()),  # this image's own seed: regenerate it alone with it
    ("model_uri", pa.string()),
    ("checkpoint_sha256", pa.string()),
    ("sampler", pa.string()),
    ("steps", pa.int64()),
    ("guidance_scale", pa.float64()),  # null for unconditional (per-class) models
    ("image_sha256", pa.string()),  # sha256 of the PNG bytes in the shard
    ("created_at", pa.string()),
    ("meddiff_version", pa.string()),
    # quality columns: null until `meddiff evaluate` fills them
    ("nearest_real_distance", pa.float64()),  # feature-space distance to the closest real training image
    ("nearest_real_pixel_distance", pa.float64()),  # pixel-space (RMSE in [0,1]) distance to the closest
    ("nearest_real_key", pa.string()),  # key of that closest real training image
    ("oracle_prob", pa.float64()),  # domain classifier's probability of the intended class (unconditional: of its own)
    ("flagged", pa.bool_()),  # memorization flag: too close to a training image
    ("oracle_class_id", pa.int64()),  # the domain classifier's predicted class (unconditional cohorts: the only one)
])
QUALITY_COLUMNS = ("nearest_real_distance", "nearest_real_pixel_distance", "nearest_real_key", "oracle_prob", "flagged",
                   "oracle_class_id")
ADDED_COLUMNS = ("oracle_class_id",)  # quality columns newer than some stored manifests: read as null when absent


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts, quality columns optional) → a table with MANIFEST_SCHEMA."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in MANIFEST_SCHEMA}
    return pa.table(cols, schema=MANIFEST_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_parquet(uri: str) -> pd.DataFrame:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{uri} is corrupt or unreadable: {e}") from e


@dataclass(frozen=True)
class Cohort:
    uri: str

    @cached_property
    def card(self) -> dict[str, Any]:
        card = read_card(self.uri, "cohort.json")
        if card.get("kind") != "cohort":
            raise ArtifactError(f"{self.uri} is not a cohort (kind={card.get('kind')!r})")
        return card

    @property
    def class_names(self) -> list[str]:
        return list(self.card["class_names"])

    @property
    def dataset_uri(self) -> str:
        return self.card["dataset_uri"]

    @property
    def unconditional(self) -> bool:
        """Sampled with the null label: no image has an intended class (class_id -1, ``UNKNOWN_CLASS``)."""
        return bool(self.card.get("unconditional"))

    def manifest(self) -> pd.DataFrame:
        df = read_parquet(storage.join(self.uri, "manifest.parquet"))
        for col in ADDED_COLUMNS:
            if col not in df.columns:
                import pandas as pd

                df[col] = pd.Series([pd.NA] * len(df), dtype="Int64")
        missing = [f.name for f in MANIFEST_SCHEMA if f.name not in df.columns]
        if missing:
            raise ArtifactError(f"{self.uri}/manifest.parquet is missing columns {missing}")
        return df

    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, s) for s in self.card["shards"]]


def open_cohort(uri: str) -> Cohort:
    c = Cohort(storage.absolute(uri))
    _ = c.card
    return c


def stored_png(uri: str, sample_id: int) -> bytes:
    """The PNG bytes of one sample as stored in its shard (found through the manifest)."""
    manifest = open_cohort(uri).manifest().set_index("sample_id")
    if sample_id not in manifest.index:
        raise ArtifactError(f"sample id {sample_id} is not in cohort {uri}")
    row = manifest.loc[sample_id]
    png = next((s["png"] for s in iter_shard(storage.join(uri, row["shard"])) if s["__key__"] == row["key"]), None)
    if png is None:
        raise ArtifactError(f"sample {row['key']} is missing from {row['shard']}: run meddiff cohorts verify {uri}")
    return png


def write_quality(uri: str, quality: pd.DataFrame) -> None:
    """Fill the manifest's quality columns from ``quality`` (indexed by sample_id), atomically."""
    cohort = open_cohort(uri)
    df = cohort.manifest().set_index("sample_id")
    unknown = set(quality.index) - set(df.index)
    if unknown:
        raise ArtifactError(f"quality rows for unknown sample ids {sorted(unknown)[:5]}")
    for col in QUALITY_COLUMNS:
        if col in quality.columns:
            df.loc[quality.index, col] = quality[col]
    table = pa.Table.from_pandas(df.reset_index(), schema=MANIFEST_SCHEMA, preserve_index=False)
    storage.write_bytes(storage.join(uri, "manifest.parquet"), parquet_bytes(table))


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    counts: dict[str, int]
    problems: list[str]


def verify(uri: str) -> VerifyResult:
    """Check that shards and manifest match exactly: same keys, no duplicates, image hashes, counts."""
    cohort = open_cohort(uri)
    df = cohort.manifest()
    problems: list[str] = []
    if df["sample_id"].duplicated().any():
        problems.append(f"{int(df['sample_id'].duplicated().sum())} duplicate sample ids in the manifest")
    if df["key"].duplicated().any():
        problems.append(f"{int(df['key'].duplicated().sum())} duplicate keys in the manifest")
    expected = dict(zip(df["key"], zip(df["shard"], df["image_sha256"], df["class_id"])))
    seen: set[str] = set()
    for shard_uri in cohort.shard_uris():
        shard = shard_uri.rsplit("/", 1)[1]
        for s in iter_shard(shard_uri):
            key = s["__key__"]
            if key in seen:
                problems.append(f"key {key} appears twice in the shards")
            seen.add(key)
            if key not in expected:
                problems.append(f"{shard}: key {key} is not in the manifest")
                continue
            m_shard, m_hash, m_cls = expected[key]
            if m_shard != shard:
                problems.append(f"{key}: manifest says shard {m_shard}, found in {shard}")
            if sha256_bytes(s["png"]) != m_hash:
                problems.append(f"{key}: image sha256 differs from the manifest")
            if int(s["cls"]) != int(m_cls):
                problems.append(f"{key}: class {int(s['cls'])} in shard, {m_cls} in manifest")
    for key in sorted(set(expected) - seen):
        problems.append(f"manifest key {key} is missing from the shards")
    counts = {str(k): int(v) for k, v in df["class_name"].value_counts().sort_index().items()}
    requested = cohort.card.get("counts") or {}
    for name, n in requested.items():
        if counts.get(name, 0) != n:
            problems.append(f"class {name}: {counts.get(name, 0)} images, cohort.json requests {n}")
    return VerifyResult(not problems, counts, problems[:50])
