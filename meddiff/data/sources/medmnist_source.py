"""MedMNIST v2/v3 2D datasets through the ``medmnist`` package's INFO (URLs, md5, labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiff.errors import SourceError, StorageError
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
        actual = file_digest(path, "md5")  # read once (a 224 px file is gigabytes)
    else:
        from meddiff.locks import artifact_lock

        path = download_root / name
        # two ingests of one file at once share download_root: one downloads, the other waits, then checks it
        with artifact_lock(str(path), on_wait):
            actual = file_digest(path, "md5") if path.is_file() else None
            if actual != md5:
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
    """The file's samples; each image is read from disk when it is prepared (see :func:`image_arrays`)."""
    info = _info(flag)
    path, md5 = fetch_npz(flag, size, root, download_root, on_wait)
    class_names = [info["label"][str(i)] for i in range(len(info["label"]))]
    name = flag if size == 28 else f"{flag}_{size}"
    images_by_split = image_arrays(path, download_root / "extracted" / f"{name}-{md5}", on_wait)
    samples: list[RawSample] = []
    with np.load(path) as npz:
        for split in SPLITS:
            images = images_by_split[split]  # N×H×W or N×H×W×3 uint8, memory-mapped
            labels = npz[f"{split}_labels"].reshape(-1)  # N×1 → N
            for i in range(len(images)):
                samples.append(RawSample(int(labels[i]), f"{name}/{split}/{i}", images[i], split))
    return SourceData(
        name=name,
        class_names=class_names,
        samples=samples,
        checksums={path.name: f"md5:{md5}"},
        license=info.get("license"),
        has_official_splits=True,
        description=info.get("description", ""),
    )


def image_arrays(npz_path: Path, folder: Path, on_wait=None) -> dict[str, np.ndarray]:
    """Each split's image array, memory-mapped from ``folder/<split>_images.npy``.

    MedMNIST's npz files are compressed, so ``np.load`` would decompress a whole split into memory: 2.6 GB for
    BloodMNIST at 224 px, 16 GB for PathMNIST. The arrays are extracted once (streamed, 1 MiB at a time) into
    ``folder`` (named for the file's md5, so reused by every later ingest of it) and mapped, so an ingest holds
    only the images it is preparing. Extraction is atomic and locked: a killed one leaves no array behind, and
    ``on_wait(owner)`` is called if another process is extracting them (see meddiff.locks.artifact_lock).
    """
    import shutil
    import zipfile

    from meddiff.locks import artifact_lock

    out = {}
    with artifact_lock(str(folder), on_wait), zipfile.ZipFile(npz_path) as z:
        for split in SPLITS:
            dest = folder / f"{split}_images.npy"
            member = z.getinfo(f"{split}_images.npy")
            if not (dest.is_file() and dest.stat().st_size == member.file_size):
                folder.mkdir(parents=True, exist_ok=True)
                part = dest.with_name(dest.name + ".part")
                try:
                    with z.open(member) as src, open(part, "wb") as f:
                        shutil.copyfileobj(src, f, 1 << 20)  # zipfile checks the member's CRC at its end
                except OSError as e:  # a full disk, most likely
                    part.unlink(missing_ok=True)
                    raise StorageError(f"cannot extract {npz_path.name}'s {member.filename} into {folder} ({e}): "
                                       f"it needs {member.file_size / 2**20:,.0f} MiB free there") from None
                part.replace(dest)
            out[split] = np.load(dest, mmap_mode="r")
    return out
