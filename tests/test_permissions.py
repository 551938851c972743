"""Published artifacts carry the process umask's permissions (as a plain write would), not the
0600/0700 of the temp files and staging folders they are built in: a downstream team reading a
shared storage folder can open what it was given."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meddiff import storage


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]
            if ".staging" not in p.parts}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_writes_follow_the_umask(umask, tmp_path, mask):
    umask(mask)
    storage.write_json(str(tmp_path / "a" / "card.json"), {"x": 1})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert storage.process_umask() == mask
    assert stat.S_IMODE((tmp_path / "a" / "card.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "a" / "card.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_ingested_dataset_is_readable_by_others(umask, medmnist_dir, tmp_path):
    """A real ingest (BreastMNIST) under umask 022: every published file 0644, every folder 0755."""
    from meddiff.data.ingest import IngestConfig, ingest

    umask(0o022)
    uri = ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)), str(tmp_path)).uri
    published = modes(Path(uri))
    assert any(name.endswith(".tar") for name in published) and "dataset.json" in published
    wrong = {name: oct(m) for name, m in published.items()
             if m != (0o755 if (Path(uri) / name).is_dir() else 0o644)}
    assert not wrong, wrong
