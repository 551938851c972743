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
    from rich.table import Column

    console = Console(stderr=True)
    # a narrow terminal (< 100 columns) gets a short bar, so that the loss and images/s fit beside it
    bar = Bar(TextColumn("{task.description}"),
              BarColumn(bar_width=None if console.width >= 100 else 8),
              MofNCompleteColumn(table_column=Column(no_wrap=True)),
              TimeElapsedColumn(table_column=Column(no_wrap=True)),
              TextColumn("{task.fields[metrics]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
              console=console, transient=False)
    task = bar.add_task(description, total=None, metrics="")
    shown: dict[str, float] = {}

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:  # shown from the first report of work: nothing to do leaves no "0/?" bar
            bar.start()
        bar.update(task, completed=done, total=total)

    def take(**metrics: float) -> None:  # the newest loss and images/s, after the elapsed time
        shown.update(metrics)
        bar.update(task, metrics=metrics_text(shown))

    update.note = take  # type: ignore[attr-defined]
    update.tell = lambda message: console.print(  # type: ignore[attr-defined]
        message, markup=False, highlight=False, soft_wrap=True)
    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


def metrics_text(metrics: dict[str, float]) -> str:
    """``loss 0.03, images/s 320``: noted metrics as a bar or a log line shows them."""
    return ", ".join(f"{k.replace('_per_s', '/s').replace('_', ' ')} {v:.4g}" for k, v in metrics.items())


def duration_text(seconds: float) -> str:
    """``4 min 02 s`` (or ``37 s``): a wait or an ETA as a log line shows it."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


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


def told_as(progress: Progress, prefix: str) -> Progress:
    """``progress`` with ``prefix`` before each message it is told (which part of a larger run speaks)."""
    def update(done: int, total: int) -> None:
        progress(done, total)

    update.note = lambda **metrics: note(progress, **metrics)  # type: ignore[attr-defined]
    update.tell = lambda message: tell(progress, prefix + message)  # type: ignore[attr-defined]
    return update


def told_only(progress: Progress | None) -> Progress:
    """``progress``'s messages without its counts: for a sub-step whose counts do not fit its bar."""
    def update(done: int, total: int) -> None:
        pass

    update.tell = lambda message: tell(progress, message)  # type: ignore[attr-defined]
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
