"""Kaggle datasets: downloaded as one zip through the ``kaggle`` package, then read as ``zip:``."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from meddiff.errors import SourceError

CREDENTIALS_HELP = (
    "Kaggle credentials not found: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), "
    "or put kaggle.json from https://www.kaggle.com/settings (API → Create New Token) in ~/.kaggle/"
)


def has_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file() or (config_dir / "access_token").is_file()


def download(ref: str, dest: Path, on_wait=None) -> Path:
    """Download ``owner/slug`` into ``dest`` as a zip (reused if already there and whole); returns its path.

    The kaggle package writes (and, after an interruption, resumes) into ``dest/.download/``; the zip is
    moved to ``dest`` only once it is complete, so a partial download is never read as the dataset.
    ``on_wait(owner)`` is called if another process is downloading it (see meddiff.locks.artifact_lock)."""
    from meddiff.locks import artifact_lock

    zip_path = dest / f"{ref.split('/', 1)[1]}.zip"
    # two ingests of one dataset at once (two flows on one worker) share dest: one downloads, the other waits
    # here and then finds the zip whole, rather than writing into (or deleting) the first one's .download/
    with artifact_lock(str(zip_path), on_wait):
        return _download(ref, dest, zip_path)


def _download(ref: str, dest: Path, zip_path: Path) -> Path:
    slug = zip_path.stem
    if zip_path.is_file():
        if zipfile.is_zipfile(zip_path):
            return zip_path
        zip_path.unlink()  # cut short by a meddiff older than the .download/ folder: fetch it again
    if not has_credentials():
        raise SourceError(CREDENTIALS_HELP)
    partial = dest / ".download"
    partial.mkdir(parents=True, exist_ok=True)
    try:
        # the kaggle package authenticates on import and calls exit(1) on failure
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(ref, path=str(partial), unzip=False, quiet=True)
    except SystemExit as e:
        raise SourceError(f"kaggle rejected the credentials ({e}). {CREDENTIALS_HELP}") from None
    except Exception as e:  # noqa: BLE001 - 401/403/404 and network errors
        raise SourceError(f"kaggle download of {ref!r} failed: {e}; re-run to resume it") from e
    got = partial / f"{slug}.zip"
    if not got.is_file():
        zips = sorted(partial.glob("*.zip"))
        if not zips:
            raise SourceError(f"kaggle download of {ref!r} produced no zip in {partial}")
        got = zips[0]
    if not zipfile.is_zipfile(got):
        got.unlink()
        raise SourceError(f"kaggle download of {ref!r} is not a zip archive (truncated?); re-run to download it again")
    os.replace(got, zip_path)  # atomic: the zip appears whole or not at all
    shutil.rmtree(partial, ignore_errors=True)  # the kaggle package's resume markers
    return zip_path
