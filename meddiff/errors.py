"""Exceptions that carry a message meant for the user (printed without a traceback by the CLI)."""

import re

FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a user-given name that is one folder under the root


class MeddiffError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class SourceError(MeddiffError):
    """A dataset source cannot be read (unknown flag, missing file, checksum mismatch, ...)."""


class UnsafeArchiveError(SourceError):
    """An archive entry would land outside the folder it is extracted/read into (zip-slip)."""


class ArtifactError(MeddiffError):
    """An artifact URI is missing, incomplete or corrupt."""


class StorageError(MeddiffError):
    """The storage root cannot be reached or written."""


class Interrupted(MeddiffError):
    """Stopped by the user (Ctrl-C) at a point it can resume from; the message says how."""


def check_seed(seed: int, flag: str = "--seed") -> None:
    """Refuse a seed numpy and torch cannot take (negative, or 2^63 and over) before anything runs."""
    if not 0 <= seed < 2**63:
        raise MeddiffError(f"{flag} must be a whole number from 0 to 2^63 - 1, got {seed}")


def check_folder_name(name: str, flag: str, folder: str, error: type[MeddiffError] = MeddiffError) -> str:
    """``name`` as given, or ``error``: it names one folder (``folder``), so no '/', no '..', no leading dot."""
    if not FOLDER_NAME.fullmatch(name):
        raise error(f"{flag} {name!r} is not a usable name: use 1-64 letters, digits, '.', '_' or '-', "
                    f"starting with a letter or digit (it names the folder {folder})")
    return name


# Messages that the Prefect flows rephrase in parameter terms (flows/common.DEPLOYMENT_WORDS): one
# definition, so the rephrasing cannot drift from the text it replaces.
COUNT_FORMS = "give exactly one of --per-class N or --total N (with optional --ratios)"
