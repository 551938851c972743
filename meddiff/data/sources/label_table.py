"""Labels from a CSV beside the images (HAM10000's metadata, ISIC's ground truth) instead of class folders.

``--labels FILE`` names the table: a file inside the zip/folder (``HAM10000_metadata.csv``) or on disk.
Each row's ``--id-column`` value names one image, by its path inside the source or its file name without
the extension; ``--label-column`` holds its class; ``--group-column`` (a patient or lesion id) keeps all
of a group's images in one split, so no patient is both trained on and held out.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

from meddiff.errors import SourceError


@dataclass(frozen=True)
class LabelSpec:
    table: str  # the CSV: a path inside the zip/folder, else a file on disk
    id_column: str = "image"  # names an image: its path inside the source, or its file name without extension
    label_column: str = "label"  # the image's class
    group_column: str | None = None  # patient/lesion id: a group's images share one split; None = no groups


@dataclass(frozen=True)
class Row:
    label: str
    group: str | None


def read_table(data: bytes, spec: LabelSpec, where: str) -> dict[str, Row]:
    """image id → its row (comma, tab or semicolon separated: the header's commonest); a clear SourceError for a missing column, an empty id or label, or an image given
    two labels. ``label_column`` "MEL,NV,BCC" reads one-hot columns (ISIC's ground truth): the label is the
    column holding 1; a row holding none of them has label "" (its image is skipped)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{where} is not UTF-8 text ({e}); save the table as UTF-8 CSV") from None
    header = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=header.count)  # a CSV, a TSV, or a semicolon CSV (a spreadsheet's export)
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = reader.fieldnames or []
    one_hot = [c.strip() for c in spec.label_column.split(",")] if "," in spec.label_column else None
    asked = {"--id-column": [spec.id_column], "--label-column": one_hot or [spec.label_column],
             "--group-column": [spec.group_column] if spec.group_column else []}
    missing = {option: [c for c in cs if c not in columns] for option, cs in asked.items()}
    if any(missing.values()):
        named = ", ".join(f"{option} {', '.join(map(repr, cs))}" for option, cs in missing.items() if cs)
        raise SourceError(f"{where} has no column {named}; its columns are {columns}")
    rows: dict[str, Row] = {}
    for line, r in enumerate(reader, start=2):
        image = (r[spec.id_column] or "").strip()
        label = _one_hot(r, one_hot, where, line) if one_hot else (r[spec.label_column] or "").strip()
        if not image or (not label and not one_hot):
            raise SourceError(f"{where} line {line}: empty {spec.id_column if not image else spec.label_column!r}; "
                              "every row needs an image id and a label")
        group = (r[spec.group_column] or "").strip() or None if spec.group_column else None
        seen = rows.setdefault(image, Row(label, group))
        if seen.label != label:
            raise SourceError(f"{where}: image {image!r} is labelled both {seen.label!r} and {label!r} "
                              f"(line {line}); remove the wrong row")
    if not rows:
        raise SourceError(f"{where} has no rows")
    return rows


def _one_hot(row: dict[str, str], columns: list[str], where: str, line: int) -> str:
    """The one column of ``columns`` holding 1 (1, 1.0, true); "" when none does."""
    def is_one(value: str | None) -> bool:
        value = (value or "").strip().lower()
        try:
            return value in ("true", "yes") or float(value) == 1
        except ValueError:
            return False

    hot = [c for c in columns if is_one(row[c])]
    if len(hot) > 1:
        raise SourceError(f"{where} line {line}: {len(hot)} of the label columns hold 1 ({hot}); one-hot labels "
                          "need exactly one per row")
    return hot[0] if hot else ""


def match_rows(paths: list[str], rows: dict[str, Row], where: str, identical: Callable[[list[str]], bool]
               ) -> tuple[dict[str, Row], list[str], int]:
    """(path → row for every image a row names, the images no row names, how many rows name no image).
    A row names an image by its path inside the source or its file name without extension; a name found in
    several folders is labelled in each only when the files are byte-identical (``identical``: HAM10000's
    Kaggle zip ships its image folders twice), else it is an error."""
    known = set(paths)
    by_stem: dict[str, list[str]] = {}
    for p in paths:
        by_stem.setdefault(PurePosixPath(p).stem, []).append(p)
    matched: dict[str, Row] = {}
    unused = 0
    for image, row in rows.items():
        hits = [image] if image in known else by_stem.get(image, []) or by_stem.get(PurePosixPath(image).stem, [])
        if len(hits) > 1 and not identical(hits):
            raise SourceError(f"label row {image!r} matches {len(hits)} different images in {where} ({hits[:3]}); "
                              "give the path inside the source in --id-column's values")
        if not hits:
            unused += 1
        for hit in hits:  # copies of one file: exact-copy removal keeps one
            matched[hit] = row
    unlabelled = [p for p in paths if p not in matched]
    return matched, unlabelled, unused
