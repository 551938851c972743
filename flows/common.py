"""Glue shared by the flows: Prefect progress artifacts and retry rules.

Flows stay thin: parse parameters into a library config, call the library, publish artifacts.
"""

from __future__ import annotations

import re

from meddiff.errors import MeddiffError, StorageError


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def prefect_progress(description: str, min_interval_s: float = 2.0):
    """A ``progress(done, total)`` callback that updates a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from meddiff.progress import throttled

    artifact_id = create_progress_artifact(progress=0.0, description=description)
    return throttled(lambda done, total: update_progress_artifact(
        artifact_id=artifact_id, progress=100.0 * done / max(total, 1)), min_interval_s)


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
