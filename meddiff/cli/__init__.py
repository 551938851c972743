"""The ``meddiff`` command: thin wrappers that parse, build a config, and call the library.

Each sub-module registers its commands on ``app``; errors meant for the user
(:class:`meddiff.errors.MeddiffError`) are printed as one line, exit status 2.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Medical image datasets → diffusion models → synthetic cohorts → quality reports.")

from meddiff.cli import datasets_cmd  # noqa: E402,F401  (registers ingest, datasets)
from meddiff.cli import cohorts_cmd  # noqa: E402,F401  (registers generate, cohorts)
from meddiff.cli import train_cmd  # noqa: E402,F401  (registers train)
from meddiff.cli import pipeline_cmd, deploy_cmd  # noqa: E402,F401  (registers pipeline, deploy)
from meddiff.cli import evaluate_cmd  # noqa: E402,F401  (registers evaluate)
from meddiff.cli import autoencoder_cmd  # noqa: E402,F401  (registers train-autoencoder, encode)


def main() -> None:
    from meddiff.errors import MeddiffError

    try:
        app()
    except MeddiffError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
