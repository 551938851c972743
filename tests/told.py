"""A progress callback for tests: a list of what the library tells its user (meddiff.progress.tell)."""

from __future__ import annotations


class Told(list):
    """``progress(done, total)`` that ignores counts and keeps every told line, in order."""

    def __call__(self, done: int, total: int) -> None:
        pass

    def tell(self, message: str) -> None:
        self.append(message)
