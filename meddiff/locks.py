"""One builder per artifact: a lock that a second process building the same artifact waits on.

Local roots use ``flock`` (dropped by the kernel when its owner dies, so a killed run never leaves a
stale lock); S3-compatible roots use a lock object created with a conditional PUT, kept alive by a
heartbeat and taken over once expired or once its owner's process is gone. See :func:`artifact_lock`.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from meddiff.errors import Interrupted, StorageError
from meddiff.progress import Progress, duration_text, tell
from meddiff.storage import _fs_options, is_remote

LOCK_TTL_ENV = "MEDDIFF_LOCK_TTL_S"
LOCK_TTL_S = 60.0  # object-storage locks expire this long after their owner's last heartbeat
LOCK_POLL_S = 1.0  # how often a waiter looks at an object-storage lock


def lock_uri(uri: str) -> str:
    """Where the lock of artifact ``uri`` lives: ``<parent>/.locks/<name>.lock`` (hidden from listings)."""
    parent, name = uri.rstrip("/").rsplit("/", 1)
    return f"{parent}/.locks/{name}.lock"


def _owner() -> dict[str, Any]:
    return {"host": os.uname().nodename, "pid": os.getpid(), "boot": _boot_id(), "since": time.time()}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _owner_dead(owner: dict[str, Any]) -> bool:
    """True when the owner ran on this machine (same host and boot) and its process is gone."""
    if owner.get("host") != os.uname().nodename or owner.get("boot") != _boot_id():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def waiting_message(what: str, owner: dict[str, Any], doing: str = "building") -> str:
    """The line a builder waiting on ``artifact_lock`` shows: who holds the lock, for how long, doing what."""
    who = "another process"
    if owner.get("pid"):
        since = owner.get("since")
        held = f", for {duration_text(time.time() - float(since))}" if isinstance(since, (int, float)) else ""
        who += f" (pid {owner['pid']} on {owner.get('host') or 'an unknown host'}{held})"
    return f"{who} is {doing} {what}: waiting for it to finish, then going on (Ctrl-C stops waiting)"


def tell_waiting(progress: Progress | None, what: str, doing: str = "building") -> Callable[[dict[str, Any]], None]:
    """An ``on_wait`` for :func:`artifact_lock` that tells ``progress``'s watcher (meddiff.progress.tell)."""
    return lambda owner: tell(progress, waiting_message(what, owner, doing))


def lock_holder(uri: str) -> dict[str, Any] | None:
    """The owner record of whoever is building artifact ``uri`` right now, or None when nobody is (or it
    cannot be told). Looks without taking the lock: a local one in /proc/locks (Linux), an object-storage
    one by its expiry and owner process."""
    if is_remote(uri):
        return _S3Lock(lock_uri(uri)).holder()
    path = Path(lock_uri(uri))
    try:
        st = path.stat()
        with open("/proc/locks") as f:  # "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
            held = {line.split()[5] for line in f if line.split()[1:2] == ["FLOCK"]}
    except (OSError, IndexError):
        return None
    if f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}" not in held:
        return None  # a lock file left by a killed owner: the kernel dropped its lock
    return _read_owner(path)


@contextmanager
def artifact_lock(uri: str, on_wait=None) -> Iterator[None]:
    """Hold the exclusive right to build artifact ``uri``; a second builder waits here until it is free.

    Callers re-check whether the artifact exists once they hold the lock (it may have been finished
    while they waited). Local roots: ``flock`` on ``<parent>/.locks/<name>.lock``; the kernel drops
    it when its owner dies, so a killed run never leaves a stale lock. Object storage: a lock object
    created with a conditional PUT (``If-None-Match: *``), refreshed by a heartbeat, taken over when
    it expired (``MEDDIFF_LOCK_TTL_S``, default 60 s) or its owner's process is gone (same host).
    ``on_wait(owner)`` is called once if the lock is busy.
    """
    lock = _S3Lock(lock_uri(uri)) if is_remote(uri) else _LocalLock(Path(lock_uri(uri)))
    try:
        lock.acquire(on_wait or (lambda owner: None))
    except KeyboardInterrupt:  # Ctrl-C while waiting for another builder: this run has changed nothing
        raise Interrupted(f"stopped waiting for the other process building {uri}; this run changed nothing: "
                          "re-run the same command to wait again") from None
    try:
        yield
    finally:
        lock.release()


class _LocalLock:
    def __init__(self, path: Path):
        self.path, self.fd = path, -1
        self.made: list[Path] = []  # folders above .locks that this lock created, deepest first

    def acquire(self, on_wait) -> None:
        import fcntl

        waited = False
        while True:
            try:
                missing = self.path.parent.parent
                while not missing.exists() and missing not in self.made:
                    self.made.append(missing)
                    missing = missing.parent
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the .locks folder was just removed by a releasing owner
                continue
            except OSError as e:
                raise StorageError(f"cannot write the lock file {self.path} ({e.strerror or e}); choose a writable "
                                   "storage root with --storage or MEDDIFF_STORAGE") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    waited = True
                    on_wait(_read_owner(self.path, settle_s=0.5))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:  # Ctrl-C while waiting: let go of the file
                    os.close(fd)
                    raise
            try:  # the file we locked must still be the one at the path (a releasing owner unlinks it)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        self.fd = fd

    def release(self) -> None:
        """Unlock, then remove .locks and the folders acquire created if they are empty (a refused build
        leaves no empty datasets/<name>/); a concurrent builder holds a lock file inside them, so they stay."""
        self.path.unlink(missing_ok=True)  # while still locked: waiters notice and re-open
        os.close(self.fd)
        for folder in (self.path.parent, *self.made):
            try:
                folder.rmdir()
            except OSError:
                break


def _read_owner(path: Path, settle_s: float = 0.0) -> dict[str, Any]:
    """The owner record in lock file ``path``, or {}. ``settle_s``: how long to wait for a record a new owner
    has not written yet (it writes it just after taking the lock; two builds started together meet there)."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            owner = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        if owner or time.monotonic() >= deadline:
            return owner
        time.sleep(0.02)


class _S3Lock:
    """A lock object on S3-compatible storage: conditional create, heartbeat, expiry, take-over."""

    def __init__(self, uri: str):
        import threading

        self.uri = uri
        self.bucket, self.key = uri.split("://", 1)[1].split("/", 1)
        self.ttl = float(os.environ.get(LOCK_TTL_ENV) or LOCK_TTL_S)
        self.etag: str | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def client(self):
        import boto3
        from botocore.config import Config

        endpoint = (_fs_options(self.uri).get("client_kwargs") or {}).get("endpoint_url")
        return boto3.client("s3", endpoint_url=endpoint,
                            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5))

    def _body(self) -> bytes:
        return json.dumps({**_owner(), "expires": time.time() + self.ttl}).encode()

    def acquire(self, on_wait) -> None:
        from botocore.exceptions import ClientError

        s3, waited = self.client(), False
        while True:
            try:
                self.etag = s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")["ETag"]
                break
            except ClientError as e:
                if e.response["Error"]["Code"] not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise StorageError(f"cannot create lock {self.uri}: {e}") from e
            try:
                got = s3.get_object(Bucket=self.bucket, Key=self.key)
                owner, etag = json.loads(got["Body"].read() or b"{}"), got["ETag"]
            except ClientError:
                continue  # released between our PUT and GET: try again
            if owner.get("expires", 0) < time.time() or _owner_dead(owner):
                if self._take_over(s3, etag):
                    break
                continue
            if not waited:
                waited = True
                on_wait(owner)
            time.sleep(LOCK_POLL_S)
        self._start_heartbeat(s3)

    def holder(self) -> dict[str, Any] | None:
        """The live owner of this lock object, or None (absent, expired, or its process gone)."""
        from botocore.exceptions import ClientError

        try:
            owner = json.loads(self.client().get_object(Bucket=self.bucket, Key=self.key)["Body"].read() or b"{}")
        except (ClientError, ValueError):
            return None
        return None if owner.get("expires", 0) < time.time() or _owner_dead(owner) else owner

    def _take_over(self, s3, etag: str) -> bool:
        """Replace a stale lock object, only if it is still the one we judged stale."""
        from botocore.exceptions import ClientError

        try:
            self.etag = s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=etag)["ETag"]
            return True
        except ClientError:
            return False

    def _start_heartbeat(self, s3) -> None:
        import threading

        def beat() -> None:
            while not self.stop.wait(self.ttl / 3):
                try:
                    self.etag = s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                              IfMatch=self.etag)["ETag"]
                except Exception:  # noqa: BLE001 - a missed beat is retried; expiry is ttl, 3 beats away
                    pass

        self.thread = threading.Thread(target=beat, name="meddiff-lock-heartbeat", daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()
        try:
            self.client().delete_object(Bucket=self.bucket, Key=self.key)
        except Exception:  # noqa: BLE001 - an undeleted lock expires after its ttl
            pass
