"""Exceptions that carry a message meant for the user (printed without a traceback by the CLI)."""


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


# Messages that the Prefect flows rephrase in parameter terms (flows/common.DEPLOYMENT_WORDS): one
# definition, so the rephrasing cannot drift from the text it replaces.
COUNT_FORMS = "give exactly one of --per-class N or --total N (with optional --ratios)"
