"""Kaggle datasets: downloaded as one zip through the ``kaggle`` package, then read as ``zip:``."""

from __future__ import annotations

import os
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


def download(ref: str, dest: Path) -> Path:
    """Download ``owner/slug`` into ``dest`` as a zip (reused if already there); returns its path."""
    owner, slug = ref.split("/", 1)
    zip_path = dest / f"{slug}.zip"
    if zip_path.is_file():
        return zip_path
    if not has_credentials():
        raise SourceError(CREDENTIALS_HELP)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        # the kaggle package authenticates on import and calls exit(1) on failure
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(ref, path=str(dest), unzip=False, quiet=True)
    except SystemExit as e:
        raise SourceError(f"kaggle rejected the credentials ({e}). {CREDENTIALS_HELP}") from None
    except Exception as e:  # noqa: BLE001 - 401/403/404 and network errors
        raise SourceError(f"kaggle download of {ref!r} failed: {e}") from e
    if not zip_path.is_file():
        zips = sorted(dest.glob("*.zip"))
        if not zips:
            raise SourceError(f"kaggle download of {ref!r} produced no zip in {dest}")
        zip_path = zips[0]
    return zip_path
