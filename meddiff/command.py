"""The ``meddiff`` console script and ``python -m meddiff``: load the CLI, then run it.

Loading takes seconds (torch, Prefect). Ctrl-C in that time used to print a 20–50 line traceback from
deep inside an import; it now says that nothing was done and exits 130, as an interrupted command does.
"""

from __future__ import annotations

import sys

STARTING = "interrupted while starting: nothing was done"


def main() -> None:
    try:
        from meddiff.cli import main as run
    except KeyboardInterrupt:
        print(STARTING, file=sys.stderr)
        raise SystemExit(130) from None
    run()
