"""Hold an artifact's build lock as another process building it would, and watch a second builder."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from told import Told

from meddiff.locks import artifact_lock


def waits_then_reuses(build: Callable[[Told], Any], artifact_uri: str, finish: Callable[[], None],
                      timeout_s: float = 300) -> tuple[Told, Any]:
    """While this test holds ``artifact_uri``'s lock, ``build(told)`` runs in a thread: it must say that it
    waits and keep waiting, until ``finish()`` (the holder's result appears) and the lock is let go.
    Returns what it told and returned; a builder that does not wait fails here."""
    told, out = Told(), []
    with artifact_lock(artifact_uri):
        worker = threading.Thread(target=lambda: out.append(build(told)), daemon=True)
        worker.start()
        deadline = time.monotonic() + timeout_s
        while not any("waiting for it to finish" in line for line in told):
            assert worker.is_alive(), f"it built {artifact_uri} without waiting for the holder of its lock: {told}"
            assert time.monotonic() < deadline, f"no word of waiting in {timeout_s} s: {told}"
            time.sleep(0.05)
        time.sleep(0.5)
        assert worker.is_alive(), "it stopped waiting while the lock was held"
        finish()
    worker.join(timeout_s)
    assert not worker.is_alive() and out, f"it did not finish once the lock was free: {told}"
    return told, out[0]
