"""Zip archives and folders of class sub-folders (the layout Kaggle datasets ship in).

Archives are read in place, never extracted; every entry is checked first and an entry that would
land outside the archive's folder (absolute, ``..``, drive letters), a symbolic link, or a zip bomb
(huge or extremely compressed entry) stops the ingest. So do names that are not UTF-8, one file
filed under two classes (a label conflict), and fewer than two classes.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import posixpath
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable

from meddiff.errors import SourceError, UnsafeArchiveError
from meddiff.records import sha256_file
from meddiff.data.dicom import is_dicom
from meddiff.data.sources import RawSample, SourceData, Split
from meddiff.data.sources.label_table import LabelSpec, match_rows, read_table

Reader = Callable[[], bytes]  # reads one file's bytes when called
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"}
IGNORED = {".DS_Store", "Thumbs.db", "desktop.ini"}
SPLIT_FOLDER_NAMES: dict[str, Split] = {"train": "train", "training": "train", "val": "val", "valid": "val",
                                        "validation": "val", "test": "test", "testing": "test"}
EMPTY_MARKER = ".meddiff-folder"  # stands for a folder entry; never a sample
MAX_ENTRY_BYTES = 512 << 20  # an archive entry larger than this (uncompressed) is refused
MAX_RATIO = 200  # ... and so is one that inflates more than this (zip bomb), once past 1 MiB


def safe_member_name(name: str) -> str:
    """The normalized relative path of an archive entry, or UnsafeArchiveError (zip-slip)."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafeArchiveError(f"archive entry {name!r} has an absolute path; refusing to read the archive")
    clean = posixpath.normpath(norm)
    if clean == ".." or clean.startswith("../"):
        raise UnsafeArchiveError(f"archive entry {name!r} escapes the archive folder (zip-slip); refusing it")
    return clean


def parse_classes(spec: str | None) -> list[tuple[str, str | None]]:
    """``"Original/*"`` or ``"Original/Benign=benign,Original/Pre=pre"`` → [(glob, name|None)]."""
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        pattern, _, name = part.partition("=")
        out.append((pattern.strip().strip("/"), name.strip() or None))
    return out


def _class_of(folder: str, rules: list[tuple[str, str | None]], base: str | None = None) -> str | None:
    """The class of the files in ``folder``: its last name, or the first ``--classes`` rule matching it.
    ``base``: the folder without its split folder (``chest_xray/train/NORMAL`` → ``chest_xray/NORMAL``),
    which rules may match too and which names the class."""
    base = folder if base is None else base
    if not rules:
        return PurePosixPath(base).name if base else None
    for pattern, name in rules:
        if fnmatch.fnmatchcase(folder, pattern) or fnmatch.fnmatchcase(base, pattern):
            return name or PurePosixPath(base).name
    return None


def _label_class(label: str, rules: list[tuple[str, str | None]]) -> str | None:
    """A label table's label as the class (a "/" in it is kept, not read as a folder), or ``--classes``'s."""
    if not rules:
        return label
    return next((name or label for pattern, name in rules if fnmatch.fnmatchcase(label, pattern)), None)


def _split_folder(folder: str) -> tuple[Split, str] | None:
    """(split, the folder without it) when exactly one of the folder's names is a split's (``train``/
    ``training``, ``val``/``valid``/``validation``, ``test``/``testing``, any case); else None."""
    parts = PurePosixPath(folder).parts
    hits = [i for i, part in enumerate(parts) if part.lower() in SPLIT_FOLDER_NAMES]
    if len(hits) != 1:
        return None
    i = hits[0]
    return SPLIT_FOLDER_NAMES[parts[i].lower()], "/".join(parts[:i] + parts[i + 1:])


def published_splits(folders: set[str]) -> tuple[dict[str, tuple[Split, str]], set[str]]:
    """Class folders inside published split folders (Kaggle's chest_xray/{train,val,test}/NORMAL, or
    Training/glioma + Testing/glioma): every folder holding images names one split. Returns folder →
    (split, folder without it) when a train and at least one other split hold class folders (else {}), and
    the split folders holding images outside any class folder (a competition's unlabelled test/)."""
    found = {f: _split_folder(f) for f in folders}
    if not folders or None in found.values():
        return {}, set()
    class_parents = {str(PurePosixPath(base).parent) for _, base in found.values() if base}  # type: ignore[misc]
    unlabelled = {f for f, (_, base) in found.items() if (base or ".") in class_parents}  # type: ignore[misc]
    labelled = {f: found[f] for f in folders - unlabelled}
    splits = {split for split, _ in labelled.values()}  # type: ignore[misc]
    return (labelled if "train" in splits and len(splits) >= 2 else {}), unlabelled  # type: ignore[return-value]


def _unnamed_dicom(p: PurePosixPath, read: Reader) -> bool:
    """A DICOM file named as PACS exports name them: no extension (IM0001) or a UID (1.2.840.113619.2.55.3.320)."""
    return (p.suffix == "" or p.suffix[1:].isdigit()) and is_dicom(read())


def _collect(entries: list[tuple[str, Reader]], classes: str | None, where: str,
             digests: dict[str, bytes] | None = None):
    """entries: (relative path, read-bytes fn) → class names, samples, skipped, split folders. digests: sha256
    by path where the caller already has them (a folder's listing), so no file is hashed twice. Class folders
    inside published split folders (``train/NORMAL``, ``test/NORMAL``) make one class, each sample keeping its
    folder's split; the last value says which folders held which split (None for other layouts)."""
    rules = parse_classes(classes)
    entries = [(rel, read) for rel, read in entries
               if PurePosixPath(rel).name not in IGNORED and not any(part.startswith("__MACOSX")
                                                                      for part in PurePosixPath(rel).parts)]
    holding = {_folder_of(rel) for rel, _ in entries if _maybe_image(PurePosixPath(rel))}  # a README aside
    in_splits, unlabelled = published_splits(holding - {""})
    skipped: list[dict[str, str]] = []
    by_class: dict[str, list[tuple[str, Reader]]] = {}
    split_of: dict[str, Split] = {}  # path → its published split folder's split
    folders_of: dict[str, set[str]] = {}
    all_folders: set[str] = set()
    for rel, read in entries:
        p = PurePosixPath(rel)
        folder = _folder_of(rel)
        if folder in unlabelled and not rules:
            if _maybe_image(p):
                skipped.append({"source_id": rel, "reason": f"unlabelled: in split folder {folder!r}, outside the "
                                                            "class folders"})
            continue
        split, base = in_splits.get(folder, (None, folder))
        all_folders.update({folder, base})
        cls = _class_of(folder, rules, base)
        if cls is None:
            if not rules and not folder:
                skipped.append({"source_id": rel, "reason": "file is not inside a class folder"})
            continue
        if p.name == EMPTY_MARKER:
            continue
        if p.suffix.lower() not in IMAGE_EXTS and not _unnamed_dicom(p, read):
            skipped.append({"source_id": rel, "reason": f"not an image file ({p.suffix or 'no extension'})"})
            continue
        by_class.setdefault(cls, []).append((rel, read))
        folders_of.setdefault(cls, set()).add(base)
        if split is not None:
            split_of[rel] = split
    _check_class_folders(rules, by_class, folders_of, all_folders, where)
    class_names = sorted(by_class)
    if len(class_names) < 2:
        raise SourceError(f"only one class ({class_names[0]!r}) in {where}; meddiff needs at least two class "
                          "folders (point at the folder holding them, or widen --classes)")
    kept, copies = _drop_exact_copies(by_class, where, digests or {})
    if "train" not in set(split_of.values()) or len(set(split_of.values())) < 2:
        split_of = {}  # --classes kept one split's folders (e.g. 'chest_xray/test/*'): split like any folder
    samples = [RawSample(class_names.index(c), rel, read, split_of.get(rel))  # read lazily
               for c in class_names for rel, read in kept[c]]
    used = {_folder_of(s.source_id) for s in samples}
    folders = ({split: sorted(f for f in used if in_splits.get(f, ("",))[0] == split)
                for split in ("train", "val", "test")} if split_of else None)
    return class_names, samples, skipped + copies, folders and {k: v for k, v in folders.items() if v}


def _check_class_folders(rules: list[tuple[str, str | None]], by_class: dict[str, list[tuple[str, Reader]]],
                         folders_of: dict[str, set[str]], all_folders: set[str], where: str) -> None:
    """One class name from two folders (without --classes), a --classes pattern matching nothing, and a class
    folder without an image are each a SourceError naming the way out."""
    if not rules:
        clashes = {c: sorted(f) for c, f in folders_of.items() if len(f) > 1}
        if clashes:
            c, fs = next(iter(clashes.items()))
            raise SourceError(
                f"class name {c!r} comes from several folders {fs} in {where}; choose with --classes, "
                f"e.g. --classes '{fs[0].rsplit('/', 1)[0]}/*'"
            )
    if rules:
        for pattern, _ in rules:
            if not any(fnmatch.fnmatchcase(f, pattern) for f in all_folders):
                raise SourceError(f"--classes pattern {pattern!r} matches no folder in {where}; "
                                  f"folders are: {sorted(f for f in all_folders if f)}")
    parents = {str(PurePosixPath(f).parent) for f in all_folders}  # folders holding folders are not classes
    empty = [f for f in sorted(all_folders - parents) if f and _class_of(f, rules) is not None
             and _class_of(f, rules) not in by_class]
    if empty or not by_class:
        raise SourceError(f"no images found for class folder(s) {empty or '(any)'} in {where}; "
                          "each class folder needs at least one image")


def _maybe_image(p: PurePosixPath) -> bool:
    """An image by its name (a PACS-style DICOM name included), without reading it."""
    return p.name != EMPTY_MARKER and (p.suffix.lower() in IMAGE_EXTS or p.suffix == "" or p.suffix[1:].isdigit())


def _collect_labelled(entries: list[tuple[str, Reader]], spec: LabelSpec, table: tuple[str, bytes], classes: str | None,
                      where: str, digests: dict[str, bytes] | None = None):
    """Like :func:`_collect`, the classes from a label table (``table``: its name and bytes) instead of folders;
    ``--classes`` globs select and rename its labels. Returns class names, samples (with their groups),
    skipped, and the card's ``labels`` record."""
    rules = parse_classes(classes)
    images = {rel: read for rel, read in entries if _maybe_image(PurePosixPath(rel)) and rel != table[0]
              and not any(part.startswith("__MACOSX") for part in PurePosixPath(rel).parts)}
    rows = read_table(table[1], spec, table[0])
    def identical(paths: list[str]) -> bool:
        return len({(digests or {}).get(p) or hashlib.sha256(images[p]()).digest() for p in paths}) == 1

    matched, unlabelled, unused = match_rows(sorted(images), rows, where, identical)
    if not matched:
        raise SourceError(f"no row of {table[0]} names an image in {where} (by path or file name without "
                          f"extension, e.g. {next(iter(rows))!r}); is --id-column {spec.id_column!r} the right one?")
    skipped = [{"source_id": rel, "reason": f"no row in {table[0]}"} for rel in unlabelled]
    skipped += [{"source_id": rel, "reason": f"its row in {table[0]} holds 1 in none of {spec.label_column}"}
                for rel, row in sorted(matched.items()) if not row.label]  # one-hot labels, another class
    by_class: dict[str, list[tuple[str, Reader]]] = {}
    for rel, row in matched.items():
        cls = _label_class(row.label, rules) if row.label else None
        if cls is not None:
            by_class.setdefault(cls, []).append((rel, images[rel]))
    for pattern, _ in rules:
        if not any(fnmatch.fnmatchcase(r.label, pattern) for r in matched.values()):
            raise SourceError(f"--classes pattern {pattern!r} matches no label in {table[0]}; labels are: "
                              f"{sorted({r.label for r in matched.values()})}")
    class_names = sorted(by_class)
    if len(class_names) < 2:
        raise SourceError(f"only {len(class_names)} class ({class_names}) in {table[0]}'s {spec.label_column!r}; "
                          "meddiff needs at least two (widen --classes, or check --label-column)")
    kept, copies = _drop_exact_copies(by_class, where, digests or {})
    samples = [RawSample(class_names.index(c), rel, read, group=matched[rel].group)
               for c in class_names for rel, read in kept[c]]
    groups = {s.group for s in samples if s.group is not None}
    record = {"table": table[0], "id_column": spec.id_column, "label_column": spec.label_column,
              "group_column": spec.group_column, "rows": len(rows), "rows_without_image": unused,
              "images_without_row": len(unlabelled), **({"groups": len(groups)} if spec.group_column else {})}
    return class_names, samples, skipped + copies, record


def _label_table(entries: list[tuple[str, Reader]], spec: LabelSpec, where: str) -> tuple[str, bytes, str | None]:
    """(name, bytes, sha256 when read from disk) of ``--labels``: a file inside the source, else on disk."""
    try:
        inside = safe_member_name(spec.table)
    except UnsafeArchiveError:  # an absolute path (or ../): not a file of the source
        inside = None
    for rel, read in entries:
        if rel == inside:
            return rel, read(), None
    path = Path(spec.table).expanduser()
    if path.is_file():
        return str(path), path.read_bytes(), sha256_file(path)
    tables = sorted(rel for rel, _ in entries if PurePosixPath(rel).suffix.lower() in (".csv", ".tsv", ".txt"))
    raise SourceError(f"--labels {spec.table!r} is neither a file inside {where} nor on disk"
                      + (f"; tables inside: {tables[:10]}" if tables else ""))


def _folder_of(rel: str) -> str:
    parent = str(PurePosixPath(rel).parent)
    return "" if parent == "." else parent


def _drop_exact_copies(by_class: dict[str, list[tuple[str, Reader]]], where: str, digests: dict[str, bytes]
                       ) -> tuple[dict[str, list[tuple[str, Reader]]], list[dict[str, str]]]:
    """Keep the first (by path) of byte-identical files in a class: a copy split apart would put a test
    image in train (the leukemia sample has 17 such pairs in 400 files, 10 of them split apart before).
    The same file under two classes is a labelling error: refused."""
    kept: dict[str, list[tuple[str, Reader]]] = {}
    copies: list[dict[str, str]] = []
    first: dict[bytes, tuple[str, str]] = {}
    for cls in sorted(by_class):
        kept[cls] = []
        for rel, read in sorted(by_class[cls], key=lambda e: e[0]):
            digest = digests.get(rel) or hashlib.sha256(read()).digest()  # one file at a time
            other_cls, other = first.setdefault(digest, (cls, rel))
            if other_cls != cls:
                raise SourceError(f"the same image is filed under two classes in {where}: {other!r} ({other_cls}) "
                                  f"and {rel!r} ({cls}); remove the wrong copy")
            if other == rel:
                kept[cls].append((rel, read))
            else:
                copies.append({"source_id": rel, "reason": f"exact duplicate of {other} (kept once, so no copy "
                                                           "can sit in another split)"})
    return kept, copies


def _check_entry(info: zipfile.ZipInfo, path: Path) -> None:
    """Refuse symbolic links, non-UTF-8 names and zip bombs before reading anything."""
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchiveError(f"archive entry {info.filename!r} in {path} is a symbolic link; refusing the archive")
    if info.file_size > MAX_ENTRY_BYTES or (
            info.file_size > (1 << 20) and info.file_size > MAX_RATIO * max(info.compress_size, 1)):
        raise UnsafeArchiveError(f"archive entry {info.filename!r} in {path} inflates to {info.file_size} bytes "
                                 f"from {info.compress_size} (zip bomb?); refusing the archive")


def _nothing() -> bytes:
    return b""


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    """One member's bytes; a damaged member (CRC, truncated) is a SourceError naming it."""
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise SourceError(f"{path} is damaged: entry {info.filename!r} cannot be read ({e}); "
                          "re-download or re-create the archive") from e


def load_zip(path: Path, classes: str | None, name: str, labels: LabelSpec | None = None) -> SourceData:
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"zip file not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise SourceError(f"{path} is not a valid zip archive ({e}); re-download or re-create it") from e
    for info in zf.infolist():  # checks every entry before reading any
        safe_member_name(info.filename)
        _check_entry(info, path)
    entries: list[tuple[str, Reader]] = []
    for info in zf.infolist():
        rel = safe_member_name(info.filename)
        if info.is_dir():
            entries.append((f"{rel}/{EMPTY_MARKER}", _nothing))  # keeps empty class folders visible
            continue
        entries.append((rel, functools.partial(_read_member, zf, info, path)))  # read when needed, not held
    return _source_data(entries, classes, labels, name, {path.name: f"sha256:{sha256_file(path)}"}, str(path))


def load_folder(path: Path, classes: str | None, name: str, labels: LabelSpec | None = None) -> SourceData:
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"folder not found: {path}")
    entries: list[tuple[str, Reader]] = []
    digests: dict[str, bytes] = {}
    listing = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        try:
            rel.encode()
        except UnicodeEncodeError:
            raise SourceError(f"file name {os.fsencode(rel)!r} in {path} is not valid UTF-8; rename it "
                              "(names are recorded in the dataset index)") from None
        if p.is_symlink() and not p.resolve().is_relative_to(path.resolve()):
            raise UnsafeArchiveError(f"{p} is a symbolic link to {p.resolve()}, outside {path}; "
                                     "copy the file in instead") from None
        if p.is_dir():
            entries.append((f"{rel}/{EMPTY_MARKER}", _nothing))
            continue
        digests[rel] = bytes.fromhex(sha256_file(p))  # streamed, not held; reused for exact copies
        listing.update(rel.encode() + b"\0" + digests[rel])
        entries.append((rel, p.read_bytes))
    return _source_data(entries, classes, labels, name, {"folder": f"sha256:{listing.hexdigest()}"}, str(path),
                        digests)


def _source_data(entries: list[tuple[str, Reader]], classes: str | None, labels: LabelSpec | None, name: str,
                 checksums: dict[str, str], where: str, digests: dict[str, bytes] | None = None) -> SourceData:
    """The samples, classed by their folders or (``labels``) by a label table; each file is read once."""
    if labels is None:
        class_names, samples, skipped, folders = _collect(entries, classes, where, digests)
        return SourceData(name=name, class_names=class_names, samples=samples, checksums=checksums, skipped=skipped,
                          split_folders=folders)
    table, data, digest = _label_table(entries, labels, where)
    class_names, samples, skipped, record = _collect_labelled(entries, labels, (table, data), classes, where, digests)
    return SourceData(name=name, class_names=class_names, samples=samples, skipped=skipped, label_table=record,
                      checksums={**checksums, **({"labels": f"sha256:{digest}"} if digest else {})})
