"""Progress reporting: library functions take a ``progress(done, total)`` callback.

The CLI passes a rich progress bar; flows pass a Prefect progress artifact and a run-logger line
(see flows/common.py). A callback may also take named metrics (the training loss, images/s) through
an optional ``note(**metrics)`` method, and one-line messages for the user (``resuming from step
131 of 300``) through an optional ``tell(message)`` method; libraries call :func:`note` and
:func:`tell`, which are no-ops for a callback without them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Progress = Callable[[int, int], None]


@contextmanager
def rich_progress(description: str) -> Iterator[Progress]:
    """A rich progress bar on stderr as a ``progress(done, total)`` callback."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        update.tell = lambda message: bar.console.print(  # type: ignore[attr-defined]
            message, markup=False, highlight=False, soft_wrap=True)
        yield update


def note(progress: Progress | None, **metrics: float) -> None:
    """Hand named metrics (e.g. ``loss=0.03``) to a progress callback that takes them (``.note``)."""
    take = getattr(progress, "note", None)
    if take is not None:
        take(**metrics)


def tell(progress: Progress | None, message: str) -> None:
    """Show a one-line message to whoever watches ``progress`` (printed above a bar, logged by a flow)."""
    take = getattr(progress, "tell", None)
    if take is not None:
        take(message)


def _with_note(update: Progress, *targets: Progress | None) -> Progress:
    """``update`` with ``note`` and ``tell`` forwarded to ``targets``."""
    update.note = lambda **metrics: [note(t, **metrics) for t in targets]  # type: ignore[attr-defined]
    update.tell = lambda message: [tell(t, message) for t in targets]  # type: ignore[attr-defined]
    return update


def combine(*callbacks: Progress | None) -> Progress:
    """One callback that forwards to several (None entries ignored), notes included."""
    live = [c for c in callbacks if c is not None]

    def update(done: int, total: int) -> None:
        for c in live:
            c(done, total)

    return _with_note(update, *live)


def throttled(callback: Progress, min_interval_s: float) -> Progress:
    """Forward ``(done, total)`` at most every ``min_interval_s`` seconds, and always the final call."""
    import time

    last = [float("-inf")]

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < min_interval_s:
            return
        last[0] = now
        callback(done, total)

    return _with_note(update, callback)
