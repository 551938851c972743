"""List tables that never cut a URI: as wide as their content, whatever the terminal's width."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def titled(title: str, *columns: str) -> Table:
    """A table at least as wide as its title, so the title (often an id or a URI a user copies) stays on
    one line instead of wrapping at the columns' narrow width ("leukemia-sample-con / ditional-…")."""
    return Table(*columns, title=title, min_width=len(title))


def print_table(table: Table) -> None:
    """Print ``table`` at its natural width (long lines wrap in the terminal, but nothing is cut:
    a URI copied from the output is whole)."""
    console = Console(width=100_000)
    width = Measurement.get(console, console.options, table).maximum
    Console(width=max(width, 1), soft_wrap=False).print(table)


def unfinished_status(uri: str, idle: str) -> str:
    """The status cell of an artifact without its record: being built right now (and by whom), or ``idle``
    (e.g. "incomplete (resumable)": a stopped run, which the same command resumes)."""
    from meddiff.locks import lock_holder

    owner = lock_holder(uri)
    if owner is None:
        return f"[yellow]{idle}"
    who = f" (pid {owner['pid']} on {owner.get('host') or '?'})" if owner.get("pid") else ""
    return f"[cyan]in progress now{who}"


def where_now(recorded: str | None, here: str, record: str) -> str | None:
    """Where an artifact a card names (by the URI it had then) is now: ``storage.relocated`` follows a
    moved or copied storage root from ``here``, the artifact being shown; a URI found nowhere is printed
    as recorded, marked as such, instead of as if it were still there."""
    from meddiff import storage

    if not recorded:
        return recorded
    return storage.relocated(recorded, here, record) or f"{recorded} (not there now: moved or deleted)"

