"""A progress callback for tests: a list of what the library tells its user (meddiff.progress.tell)."""

from __future__ import annotations


class Told(list):
    """``progress(done, total)`` that keeps every told line, in order, and every count in ``counts``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.counts.append((done, total))

    def tell(self, message: str) -> None:
        self.append(message)
