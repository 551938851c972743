"""List tables that never cut a URI: as wide as their content, whatever the terminal's width."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


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


UNREADABLE = "unreadable (see below)"  # a listed artifact whose record cannot be read


def readable(read: Callable[[], Any], problems: list[str]) -> Any:
    """``read()`` (a listed artifact's record), or None with its one-line reason added to ``problems``: one
    damaged record hid every other artifact of a listing (or was a JSON traceback), now it is one row."""
    from meddiff.errors import ArtifactError

    try:
        return read()
    except (ArtifactError, ValueError, KeyError) as e:
        problems.append(str(e) if isinstance(e, ArtifactError) else f"{type(e).__name__}: {e}")
        return None


def print_listing(table: Table, what: str, root: str, made_by: str, problems: Sequence[str] = ()) -> None:
    """A list table, then a warning per record it could not read; when it is empty, a line on stderr saying
    where was looked and why nothing is there (a mistyped bucket or --storage listed nothing, silently)."""
    print_table(table)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if table.row_count:
        return
    from meddiff import storage

    why = storage.missing_reason(root)
    print(f"no {what} under {root}" + (f": {why}" if why else f" ({made_by} makes them)"), file=sys.stderr)


def print_fitted(console: Console, table: Table) -> None:
    """Print a table of figures in the terminal's width where its words fit: cells wrap at spaces, and
    no word is ever cut. Rich's own fitting cuts a cell that does not fit with an ellipsis: at 80
    columns a sweep's KID of 2.004e+04 printed as '2.004e+…', beside another row's 2020. A table whose
    longest words are wider than the terminal is printed that wide (the terminal wraps its lines)."""
    widths = word_widths(table, console.width)
    for col, width in zip(table.columns, widths):
        col.width = width
    need = sum(widths) + _chrome(table)
    Console(file=console.file, width=max(console.width, need, table.min_width or 0), soft_wrap=False,
            color_system=console.color_system, force_terminal=console.is_terminal).print(table)


def word_widths(table: Table, width: int) -> list[int]:
    """Column widths (padding excluded) for a table printed ``width`` wide: each column's longest line
    where all fit, else its longest word plus a share of the room left, by how much more it wants."""
    def plain(cell) -> str:
        return cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain

    cells = [[plain(c) for c in (col.header, *col._cells)] for col in table.columns]
    lo = [max((len(w) for c in col for w in c.split()), default=1) for col in cells]  # the longest word
    hi = [max(lo_i, *(len(line) for c in col for line in c.splitlines() or [""])) for lo_i, col in zip(lo, cells)]
    room = width - _chrome(table)
    if sum(hi) <= room or sum(lo) >= room:
        return hi if sum(hi) <= room else lo
    want = [h - w for h, w in zip(hi, lo)]  # how much wider each column would like to be
    share = [(room - sum(lo)) * w // sum(want) for w in want]
    return [w + extra for w, extra in zip(lo, share)]


def _chrome(table: Table) -> int:
    """Width of a table's padding and rules."""
    n = len(table.columns)
    rules = (n + 1 if table.show_edge else n - 1) if table.box else 0
    return n * (table.padding[1] + table.padding[3]) + rules


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

