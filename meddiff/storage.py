"""Where artifacts live: a local folder (default ``./storage``) or an ``s3://bucket/prefix``.

The root comes from ``MEDDIFF_STORAGE`` (or an explicit argument). Remote roots go through
fsspec/s3fs; endpoint and keys come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), which is how MinIO is reached.

An artifact's URI is simply its location. Every artifact is a folder whose record file
(``dataset.json``, ``model.json``, ``cohort.json`` ...) is written last: an artifact is complete
exactly when its record exists. Local folders are additionally built in a hidden staging folder
and renamed into place, so a half-written artifact is never visible under its final name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import fsspec

from meddiff.errors import StorageError

ENV_VAR = "MEDDIFF_STORAGE"
DEFAULT_ROOT = "storage"  # relative to the current directory, like the repository's storage/


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def storage_root(root: str | None = None) -> str:
    """Resolve the storage root: explicit argument, else $MEDDIFF_STORAGE, else ./storage."""
    return absolute(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _fs_options(uri: str) -> dict[str, Any]:
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # no listings cache: several processes (workers, a concurrent run) write the same prefixes, and a
        # cached listing would answer exists() with what was there when this process first looked
        opts: dict[str, Any] = {"use_listings_cache": False,
                                "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"},
                                                  "connect_timeout": 5, "read_timeout": 60}}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or remote URL."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), str(Path(uri).expanduser().resolve())
    fs, path = fsspec.core.url_to_fs(uri, **_fs_options(uri))
    return fs, path


def absolute(uri: str) -> str:
    """An artifact's URI as records name it: a local path made absolute (so a card, a manifest or a
    report means the same place whatever directory the command ran in), a remote URL as it is."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return uri.rstrip("/") if is_remote(uri) else str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


LAYOUT = ("datasets", "models", "autoencoders", "cohorts")  # the folders directly under a storage root


def dataset_root(dataset_uri: str) -> str | None:
    """The storage root of a dataset version at ``<root>/datasets/<name>/<version>``; None elsewhere
    (a version folder outside a storage root's layout)."""
    parts = dataset_uri.rstrip("/").split("/")
    return "/".join(parts[:-3]) if len(parts) >= 4 and parts[-3] == "datasets" else None


def relocated(recorded: str, anchor: str, record: str) -> str | None:
    """Where an artifact a card names (``recorded``, e.g. a cohort's dataset) is now: ``recorded`` while
    its ``record`` file is there, else the same layout path (``datasets/<name>/<version>``,
    ``models/<run>``) under the storage root that ``anchor`` (the artifact being read) sits in, when its
    ``record`` is there: a root that was moved, copied or mounted elsewhere keeps working. Else None."""
    if exists(join(recorded, record)):
        return recorded

    def split(uri: str) -> tuple[str, str] | None:  # (root, layout path) at the last layout folder
        parts = uri.rstrip("/").split("/")
        top = max((i for i, p in enumerate(parts) if p in LAYOUT), default=None)
        return None if top is None else ("/".join(parts[:top]), "/".join(parts[top:]))

    old, here = split(recorded), split(anchor)
    if old is None or here is None or not here[0]:
        return None
    moved = join(here[0], old[1])
    return moved if exists(join(moved, record)) else None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.exists(path)
    except Exception as e:  # noqa: BLE001 - endpoint errors become one clear message
        hint = remote_hint(e)
        raise StorageError(f"cannot reach storage at {uri}: {e}" + (f"; {hint}" if hint else "")) from e


def endpoint_text() -> str:
    """The S3 endpoint requests go to, as an error message names it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


def missing_reason(root: str) -> str | None:
    """Why nothing can be under storage root ``root``: its bucket or folder does not exist (None when it does)."""
    if not is_remote(root):
        return None if Path(root).expanduser().exists() else "the folder does not exist (check --storage / MEDDIFF_STORAGE)"
    missing = missing_bucket(root)
    return missing and f"{missing} (check --storage / MEDDIFF_STORAGE)"


def missing_bucket(uri: str) -> str | None:
    """'bucket B does not exist at <endpoint>' when remote ``uri``'s bucket is not there, else None."""
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    return None if fs.exists(bucket) else f"bucket {bucket} does not exist at {endpoint_text()}"


REMOTE_CLIENTS = ("botocore", "aiobotocore", "s3fs")  # an object store's errors pass through these (not Kaggle's)
UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
               "ClientConnectorError", "ServerDisconnectedError"}
REFUSED = ("Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "(403)")


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and not any(x is c for c in chain):
        chain.append(x)
        x = x.__cause__ or x.__context__
    return chain


def remote_error(e: BaseException) -> str | None:
    """One line for a failed object-store request (what the server said, then what to fix); None when ``e``
    did not come from the object store's client."""
    hint = remote_hint(e)
    root = _chain(e)[-1]
    return None if hint is None else f"storage request failed ({type(root).__name__}: {root}): {hint}"


def remote_hint(e: BaseException) -> str | None:
    """What to fix when ``e`` came from the object store's client (no server there, keys refused, no such
    bucket); None when it did not. The client's own error is a 75–130 line botocore traceback."""
    chain = _chain(e)
    if not any(type(c).__module__.split(".")[0] in REMOTE_CLIENTS for c in chain):
        return None
    endpoint = endpoint_text()
    said = " ".join(f"{type(c).__name__} {c}" for c in chain)
    if any(type(c).__name__ in UNREACHABLE for c in chain):
        return f"no S3 server answers at {endpoint}: start it, or point AWS_ENDPOINT_URL at it"
    if "NoSuchBucket" in said:
        return f"the bucket does not exist at {endpoint}: create it, or fix MEDDIFF_STORAGE / --storage"
    if isinstance(e, PermissionError) or any(word in said for word in REFUSED):
        return (f"the S3 server at {endpoint} refused these credentials: check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (and that they may use the bucket)")
    return "check MEDDIFF_STORAGE, AWS_ENDPOINT_URL and the keys"


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


WRITE_FAULTS = {  # errno → what the user can do; these OSErrors become one-line StorageErrors
    errno.ENOSPC: "the disk is full: free space (or choose another --storage / MEDDIFF_STORAGE) and re-run; "
                  "finished work is kept, nothing half-written was published",
    errno.EDQUOT: "the disk quota is exhausted: free space and re-run; nothing half-written was published",
    errno.EACCES: "permission denied: make it writable (or choose another --storage / MEDDIFF_STORAGE) and re-run",
    errno.EPERM: "operation not permitted: make it writable (or choose another --storage) and re-run",
    errno.EROFS: "the storage is read-only: choose a writable --storage / MEDDIFF_STORAGE and re-run",
}


@contextmanager
def write_faults(where: str | Path) -> Iterator[None]:
    """Turn disk-full / permission / read-only OSErrors inside into a StorageError naming the path."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_FAULTS:
            raise
        raise StorageError(f"cannot write {e.filename or where}: {e.strerror or e}; {WRITE_FAULTS[e.errno]}") from e


def process_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``; else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """Write a local file atomically: a temp file beside ``dest``, fsynced, then renamed over it.

    A writer killed mid-way leaves only a hidden ``.<name>.<pid>.*.tmp`` file, never a partial ``dest``;
    the next writer of ``dest`` removes such files of dead processes (this host's). A disk-full /
    permission / read-only fault removes the temp file and raises a StorageError naming ``dest``.
    """
    with write_faults(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        sweep_dead(dest.parent, f".{dest.name}.", ".tmp")
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
        try:
            os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp's 0600 → what a plain open() would give
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead(folder: Path, prefix: str, suffix: str = "") -> None:
    """Remove ``<prefix><pid>.*<suffix>`` temp files/folders in ``folder`` whose writer process is gone."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for p in entries:
        rest = p.name[len(prefix):]
        if not (p.name.startswith(prefix) and p.name.endswith(suffix)) or not rest.split(".")[0].split("-")[0].isdigit():
            continue
        if not pid_alive(int(rest.split(".")[0].split("-")[0])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: temp file + rename locally; a single PUT (atomic by S3 semantics) remotely."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    with atomic_file(Path(path)) as f:
        f.write(data)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under a folder URI; [] when it does not exist.

    Hidden names (``.locks``, ``.staging``, ``.<file>.tmp``) are bookkeeping, never artifacts: left out."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    names = (Path(p.rstrip("/")).name for p in fs.ls(path, detail=False))
    return sorted(n for n in names if not n.startswith("."))


def local_staging(root: str, kind: str) -> Path:
    """A fresh private folder to build an artifact in before publishing it.

    Local roots stage inside ``<root>/.staging`` (same filesystem, so publishing is a rename);
    remote roots stage in the system temp folder.
    """
    base = Path(root) / ".staging" if not is_remote(root) else Path(tempfile.gettempdir()) / "meddiff-staging"
    try:
        base.mkdir(parents=True, exist_ok=True)
        sweep_dead(base, f"{kind}-")  # staging of a killed run of the same artifact (callers hold its lock)
        return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=base))
    except OSError as e:
        raise StorageError(f"cannot write under storage root {root}: {e}; choose a writable "
                           f"folder with --storage or {ENV_VAR}") from e


def _rename_into_place(staging: Path, dest: Path, last: set[str]) -> None:
    """Compare-and-swap publish of a local folder (see ``publish_dir``)."""
    while True:
        try:
            os.rename(staging, dest)
            return
        except OSError:
            if not dest.exists():
                raise
        if last and all((dest / name).exists() for name in last):
            shutil.rmtree(staging, ignore_errors=True)
            return
        trash = dest.parent / f".trash-{dest.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(dest, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def publish_dir(staging: Path, dest_uri: str, last: Iterable[str] = ()) -> None:
    """Move a finished staging folder to ``dest_uri``; files named in ``last`` land last.

    Local: compare-and-swap by one atomic rename, which fails while ``dest`` exists: a complete
    ``dest`` (its ``last`` record present, published by a concurrent builder of the same content)
    wins and the staging folder is dropped; an incomplete leftover is moved aside and the rename
    retried. Remote: upload every file, then the ``last`` files (the record), so readers never see a
    complete-looking partial upload.
    """
    last = set(last)
    if not is_remote(dest_uri):
        dest = Path(dest_uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for old in dest.parent.glob(f".trash-{dest.name}-*"):  # a publisher killed while clearing it
            shutil.rmtree(old, ignore_errors=True)
        staging.chmod(0o777 & ~process_umask())  # mkdtemp's 0700 → readable like a plain mkdir
        with write_faults(dest):
            _rename_into_place(staging, dest, last)
        return
    fs, path = filesystem(dest_uri)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    for group in ([p for p in files if p.name not in last], [p for p in files if p.name in last]):
        for p in group:
            rel = p.relative_to(staging).as_posix()
            with_retries(lambda: fs.put_file(str(p), f"{path}/{rel}"), what=f"upload to {dest_uri}/{rel}")
    shutil.rmtree(staging, ignore_errors=True)


def endpoint_of(uri: str) -> str:
    """Which server a remote URI lives on (its scheme and endpoint URL); "" for local paths."""
    if not is_remote(uri):
        return ""
    endpoint = (_fs_options(uri).get("client_kwargs") or {}).get("endpoint_url") or "default"
    return f"{uri.split('://', 1)[0]}://{endpoint}"


def fetch_local(uri: str, cache: Path | None = None) -> Path:
    """A local path for ``uri``: itself when local, else a cached download.

    The cache is keyed by endpoint and path, and a cached copy is reused only while its size and
    ETag match the object's: two S3 endpoints with the same bucket name, or an object rewritten in
    place, never serve stale bytes.
    """
    if not is_remote(uri):
        return Path(uri)
    import hashlib

    cache = cache or Path(tempfile.gettempdir()) / "meddiff-cache"
    fs, path = filesystem(uri)
    info = with_retries(lambda: fs.info(path), what=f"stat {uri}")
    version = f"{info.get('size')}-{info.get('ETag') or info.get('etag') or info.get('LastModified') or ''}"
    key = hashlib.sha256(f"{endpoint_of(uri)}\n{version}".encode()).hexdigest()[:16]
    dest = cache / key / path
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        with_retries(lambda: fs.get_file(path, str(tmp)), what=f"download {uri}")
        os.replace(tmp, dest)
    return dest


def with_retries(fn, what: str, attempts: int = 3, backoff_s: float = 1.0):
    """Call ``fn`` with exponential backoff; the final error names ``what``."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if i == attempts - 1:
                raise StorageError(f"{what} failed after {attempts} attempts: {e}") from e
            time.sleep(backoff_s * 2**i)


def check_reachable(root: str | None = None, attempts: int = 3, backoff_s: float = 1.0) -> str:
    """Fail fast (after ``attempts`` tries with backoff) when the storage root cannot be reached.

    Remote roots: lists the bucket through the configured endpoint; local roots: creates the folder.
    Returns the resolved root; the error names the root and the endpoint URL.
    """
    root = storage_root(root)
    if not is_remote(root):
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create storage folder {root}: {e}") from e
        return root
    # a probe without the client's own retries: the attempts and backoff are with_retries'
    opts = _fs_options(root)
    if "config_kwargs" in opts:
        opts["config_kwargs"] = {**opts["config_kwargs"], "retries": {"max_attempts": 1}, "connect_timeout": 3}
    fs, path = fsspec.core.url_to_fs(root, skip_instance_cache=True, **opts)
    if hasattr(fs, "retries"):
        fs.retries = 1
    endpoint = endpoint_text()
    bucket = path.split("/", 1)[0]
    with_retries(lambda: fs.ls(bucket, refresh=True), attempts=attempts, backoff_s=backoff_s,
                 what=f"reaching storage {root} at {endpoint} (check MEDDIFF_STORAGE, AWS_ENDPOINT_URL and the keys)")
    return root

