"""Glue shared by the flows: worker-environment defaults, progress in the run logger and as an
artifact, links between artifacts, run names and tags, retry rules, one traceback per failure.

Flows stay thin: parse parameters into a library config, call the library, publish artifacts.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, get_args

from meddiff.errors import COUNT_FORMS, Interrupted, MeddiffError, StorageError
from meddiff.progress import duration_text, metrics_text

MEDMNIST_ENV = "MEDMNIST_ROOT"  # the same variable the CLI reads for --medmnist-root
LOG_EVERY_S = 30.0  # seconds between progress lines in the run logger (the first and last always)
# CLI flags in library messages → what a deployment user passes instead
DEPLOYMENT_WORDS = {
    "--medmnist-root DIR": f"--param medmnist_root=DIR (or {MEDMNIST_ENV} in the worker's environment)",
    "--medmnist-root": "the medmnist_root parameter",
    "--storage or MEDDIFF_STORAGE": "--param storage_root=... or MEDDIFF_STORAGE in the worker's environment",
    # the deployments set per_class=50: a run asking for a total must clear it (the library's own message)
    COUNT_FORMS: "give exactly one of per_class and total (the deployment sets per_class=50: with --param total=N "
                 "also pass --param per_class=null)",
    "--unconditional": "unconditional=true",
}
RESULT_OPTIONS = dict(persist_result=True, result_serializer="json")  # small results: URIs and cards


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def from_env(value: str | None, var: str) -> str | None:
    """A flow parameter left empty falls back to the worker's environment, as the CLI does."""
    return value or os.environ.get(var) or None


def prefect_progress(description: str, min_interval_s: float = 2.0):
    """A ``progress(done, total)`` callback that updates a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from meddiff.progress import throttled

    artifact_id = create_progress_artifact(progress=0.0, description=description)
    return throttled(lambda done, total: update_progress_artifact(
        artifact_id=artifact_id, progress=100.0 * done / max(total, 1)), min_interval_s)


class LoggedProgress:
    """A progress callback writing ``stage: done/total (pct), rate, ETA`` (+ noted metrics such as the
    training loss) to a logger: on the first call, then at most every ``every_s``, and at the end. Units of
    unequal work (``even=False``: evaluate's stages, one of which takes most of the time) get no rate or ETA,
    which would mislead ("ETA 10 min" for a run ending in half a minute); the end line says the time taken."""

    def __init__(self, logger, stage: str, unit: str = "", every_s: float = LOG_EVERY_S, even: bool = True):
        self.logger, self.stage, self.unit, self.every_s, self.even = logger, stage, unit, every_s, even
        self.start = self.last = None
        self.first_done = self.last_done = 0
        self.notes: dict[str, float] = {}

    def note(self, **metrics: float) -> None:
        self.notes.update(metrics)

    def tell(self, message: str) -> None:
        self.logger.info(f"{self.stage}: {message}")

    def __call__(self, done: int, total: int) -> None:
        if self.last is not None and done == total == self.last_done:
            return  # the end already said
        self.last_done = done
        now = time.monotonic()
        if self.start is None:
            self.start, self.first_done = now, done
        elif done < total and now - self.last < self.every_s:
            return
        self.last = now
        rate = (done - self.first_done) / max(now - self.start, 1e-9)
        parts = [f"{self.stage}: {done}/{total}{self.unit} ({100 * done / max(total, 1):.0f}%)"]
        parts += [metrics_text(self.notes)] if self.notes else []
        if not self.even:
            parts += [f"in {duration_text(now - self.start)}"] if done == total else []
        elif rate > 0 and done > self.first_done:
            parts.append(f"{rate:.3g}{self.unit or ' steps'}/s")
            if done < total:
                parts.append(f"ETA {duration_text((total - done) / rate)}")
        self.logger.info(", ".join(parts))


def link_url(uri: str, expires_s: int = 7 * 24 * 3600) -> str:
    """A clickable URL for a storage URI: file:// for local paths, a presigned https URL for S3."""
    from meddiff import storage

    if not storage.is_remote(uri):
        return Path(uri).resolve().as_uri()
    try:
        fs, path = storage.filesystem(uri)
        return fs.sign(path, expiration=expires_s)
    except Exception:  # noqa: BLE001 - a folder or an endpoint without signing: show the URI itself
        return uri


def publish_link(kind: str, uri: str, name: str, target: str | None = None) -> None:
    """A link artifact (``dataset`` → ``model`` → ``cohort`` → ``report``) to a stage's output."""
    from prefect.artifacts import create_link_artifact

    create_link_artifact(link=link_url(target or uri), link_text=uri, key=artifact_key(kind, name),
                         description=f"{kind}: {uri}")


def tag_run(*tags: str) -> None:
    """Add tags (e.g. ``dataset:bloodmnist``) to the current flow run, so the UI can filter by them."""
    from prefect import runtime
    from prefect.client.orchestration import get_client

    run_id = runtime.flow_run.id
    if not run_id:
        return
    with get_client(sync_client=True) as client:
        existing = list(client.read_flow_run(run_id).tags or [])
        client.update_flow_run(run_id, tags=existing + [t for t in tags if t not in existing])


def dataset_tag(uri_or_source: str) -> str:
    """``dataset:<name>`` from a source (``medmnist:bloodmnist``; named as ingest names it) or a
    dataset/model/cohort URI."""
    from meddiff.data.sources import SourceKind, dataset_name, parse_source

    tail = uri_or_source.rstrip("/")
    if "://" not in tail and tail.split(":", 1)[0] in get_args(SourceKind):
        try:
            return f"dataset:{dataset_name(None, parse_source(tail).default_name, tail)}"
        except MeddiffError:
            return "dataset:unknown"
    parts = [p for p in re.split(r"[/:]", tail) if p]
    if "datasets" in parts and parts.index("datasets") + 1 < len(parts):
        return f"dataset:{parts[parts.index('datasets') + 1]}"
    return f"dataset:{parts[-1].split('-')[0] if parts else 'unknown'}"


@contextmanager
def user_errors() -> Iterator[None]:
    """Phrase a user error for how the flow was invoked: a deployment run is told about parameters
    and the worker's environment instead of CLI flags. The exception itself is re-raised (one traceback)."""
    try:
        yield
    except MeddiffError as e:
        from prefect import runtime

        if runtime.deployment.id and e.args:
            msg = str(e.args[0])
            for flag, words in DEPLOYMENT_WORDS.items():
                msg = msg.replace(flag, words)
            e.args = (msg, *e.args[1:])
        raise


def phrased(fn):
    """``fn`` with :func:`user_errors` around it: for task bodies, so the task's own failure log (the
    first one, with the traceback) already reads right."""
    import functools

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with user_errors():
            return fn(*args, **kwargs)

    return call


class _OneTraceback(logging.Filter):
    """Drop the traceback from a log record whose exception was already logged with one, and from every
    record of a Ctrl-C (``Interrupted``): the user stopped the run, and its message says how to resume."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            if id(exc) in self.seen or isinstance(exc, Interrupted):
                record.exc_info, record.exc_text = None, None
            else:
                self.seen.add(id(exc))
        return True


_ONE_TRACEBACK = _OneTraceback()


def required(value: str, name: str, made_by: str) -> str:
    """A URI parameter that must not be empty (the server accepts "" for a str): one clear line."""
    lists = {"ingest-dataset": "datasets", "train-model": "models", "generate-cohort": "cohorts"}
    if not value or not value.strip():
        raise MeddiffError(f"{name} is empty: pass --param {name}=<URI>, the result of an earlier {made_by} run "
                           f"(`meddiff {lists.get(made_by, 'datasets')} list` shows them)")
    return value


def one_traceback_per_failure() -> None:
    """Install (once) the filter: a failing task logs its traceback, its flow only the failure line (and a
    Ctrl-C no traceback at all)."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if _ONE_TRACEBACK not in logger.filters:
            logger.addFilter(_ONE_TRACEBACK)


def retry_transient(task, task_run, state) -> bool:
    """Retry condition: retry I/O and storage failures, never user errors (they would fail again)."""
    try:
        state.result()
    except StorageError:
        return True
    except MeddiffError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


def explain_wait(min_wait_s: float = 20.0) -> None:
    """Say in the run logger how long this run sat scheduled before a worker took it, and why it showed
    as "Late" meanwhile: a work pool slot (e.g. the gpu pool's concurrency limit) or no worker polling.
    The wait ends when the run turned Pending (picked up), so the worker's process start is not counted."""
    from prefect import get_run_logger, runtime
    from prefect.client.orchestration import get_client

    if not runtime.flow_run.id or runtime.flow_run.parent_flow_run_id:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(runtime.flow_run.id)
        picked = [s.timestamp for s in client.read_flow_run_states(runtime.flow_run.id) if s.type.value == "PENDING"]
        if run.expected_start_time is None or not picked or not run.work_pool_name:
            return
        waited = (min(picked) - run.expected_start_time).total_seconds()
        if waited < min_wait_s:
            return
        limit = client.read_work_pool(run.work_pool_name).concurrency_limit
    reason = (f"its concurrency limit of {limit} concurrent run(s) was taken by other runs" if limit else
              "no worker had picked it up (is one polling the pool?)")
    get_run_logger().info("waited %s after its scheduled time for a slot in work pool %r (shown as Late meanwhile): "
                          "%s", duration_text(waited), run.work_pool_name, reason)
