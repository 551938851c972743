"""MedMNIST v2/v3 2D datasets through the ``medmnist`` package's INFO (URLs, md5, labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiff.errors import SourceError
from meddiff.records import file_digest
from meddiff.data.sources import SPLITS, RawSample, SourceData

SIZES = (28, 64, 128, 224)


def _info(flag: str) -> dict:
    import medmnist

    if flag not in medmnist.INFO:
        known = ", ".join(k for k in medmnist.INFO if not k.endswith("3d"))
        raise SourceError(f"unknown MedMNIST flag {flag!r}; 2D flags are: {known}")
    if flag.endswith("3d"):
        raise SourceError(f"{flag} is a 3D MedMNIST set; meddiff ingests 2D images only")
    info = medmnist.INFO[flag]
    if info["task"].startswith("multi-label"):
        raise SourceError(
            f"{flag} is multi-label ({info['task']}); meddiff cohorts need one class per image"
        )
    return info


def npz_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def fetch_npz(flag: str, size: int, root: Path | None, download_root: Path, on_wait=None) -> tuple[Path, str]:
    """Path of the verified npz and its md5. ``root`` = already-downloaded files (no download). ``on_wait(owner)``
    is called if another process is downloading it (see meddiff.locks.artifact_lock)."""
    if size not in SIZES:
        raise SourceError(f"MedMNIST size must be one of {SIZES}, got {size}")
    info = _info(flag)
    suffix = "" if size == 28 else f"_{size}"
    url, md5 = info[f"url{suffix}"], info[f"MD5{suffix}"]
    name = npz_name(flag, size)
    if root is not None:
        path = Path(root) / name
        if not path.is_file():
            raise SourceError(
                f"{name} not found in --medmnist-root {root}; download it from {url} "
                "or leave --medmnist-root unset to download it automatically"
            )
    else:
        from meddiff.locks import artifact_lock

        path = download_root / name
        # two ingests of one file at once share download_root: one downloads, the other waits, then checks it
        with artifact_lock(str(path), on_wait):
            if not path.is_file() or file_digest(path, "md5") != md5:
                _download(url, path)
    actual = file_digest(path, "md5")
    if actual != md5:
        raise SourceError(f"md5 mismatch for {path}: expected {md5}, got {actual}; delete it and re-download")
    return path, md5


def _download(url: str, path: Path) -> None:
    import urllib.request

    from meddiff.storage import with_retries

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")

    def get() -> None:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
        tmp.replace(path)

    try:
        with_retries(get, what=f"download {url}")
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{e}. Offline? Put {path.name} in a folder and pass --medmnist-root DIR") from e


def load(flag: str, size: int, root: Path | None, download_root: Path, on_wait=None) -> SourceData:
    info = _info(flag)
    path, md5 = fetch_npz(flag, size, root, download_root, on_wait)
    class_names = [info["label"][str(i)] for i in range(len(info["label"]))]
    samples: list[RawSample] = []
    with np.load(path) as npz:
        for split in SPLITS:
            images = npz[f"{split}_images"]  # N×H×W or N×H×W×3, uint8
            labels = npz[f"{split}_labels"].reshape(-1)  # N×1 → N
            for i in range(len(images)):
                samples.append(RawSample(int(labels[i]), f"{flag}{'' if size == 28 else f'_{size}'}/{split}/{i}",
                                         images[i], split))
    return SourceData(
        name=flag if size == 28 else f"{flag}_{size}",
        class_names=class_names,
        samples=samples,
        checksums={path.name: f"md5:{md5}"},
        license=info.get("license"),
        has_official_splits=True,
        description=info.get("description", ""),
    )
