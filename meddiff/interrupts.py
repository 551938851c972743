"""Ctrl-C at a step boundary: the first SIGINT asks a training loop to stop after its current step (it
writes a checkpoint there and says how to resume); a second one interrupts at once."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class StopRequest:
    requested: bool = False  # set by the first SIGINT inside stop_on_interrupt


@contextmanager
def stop_on_interrupt(enabled: bool = True) -> Iterator[StopRequest]:
    """Within the block, the first SIGINT only sets ``requested``; the handler is restored on exit.

    Off (``requested`` stays False) outside the main thread, where a handler cannot be installed (a task
    run in a worker thread), and when ``enabled`` is False (DDP: ranks would stop at different steps)."""
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: object) -> None:
        if stop.requested:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.requested = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
