"""Progress reporting: library functions take a ``progress(done, total)`` callback.

The CLI passes a rich progress bar; flows pass a Prefect progress artifact (see flows/common.py).
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

        yield update


def combine(*callbacks: Progress | None) -> Progress:
    """One callback that forwards to several (None entries ignored)."""
    live = [c for c in callbacks if c is not None]

    def update(done: int, total: int) -> None:
        for c in live:
            c(done, total)

    return update
