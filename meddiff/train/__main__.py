"""``python -m meddiff.train`` / ``torchrun -m meddiff.train``: the ``meddiff train`` command.

A thin entry point, so the library never imports the CLI."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from meddiff.command import main as cli_main

    sys.argv = ["meddiff", "train", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
