"""The ``meddiff`` command: thin wrappers that parse, build a config, and call the library.

Each sub-module registers its commands on ``app``; errors meant for the user
(:class:`meddiff.errors.MeddiffError`, and an object store refusing a request or not there) are printed
as one line, exit status 2.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Medical image datasets → diffusion models → synthetic cohorts → quality reports.")



@app.callback()
def _options(threads: int = typer.Option(None, "--threads", min=1, envvar="MEDDIFF_THREADS",
                                         help="CPU threads per process (default: the CPUs free right now).")) -> None:
    """Options for every command (before the command name: ``meddiff --threads 1 train ...``)."""
    import os

    if threads is not None:
        os.environ["MEDDIFF_THREADS"] = str(threads)
        from meddiff.threads import oversubscription

        if (warning := oversubscription(threads)):
            typer.secho(f"warning: {warning}", fg="yellow", err=True)


from meddiff.cli import datasets_cmd  # noqa: E402,F401  (registers ingest, datasets)
from meddiff.cli import cohorts_cmd  # noqa: E402,F401  (registers generate, cohorts)
from meddiff.cli import train_cmd  # noqa: E402,F401  (registers train)
from meddiff.cli import pipeline_cmd, deploy_cmd  # noqa: E402,F401  (registers pipeline, deploy)
from meddiff.cli import evaluate_cmd  # noqa: E402,F401  (registers evaluate)
from meddiff.cli import calibrate_cmd  # noqa: E402,F401  (registers calibrate)
from meddiff.cli import likelihood_cmd, analysis_cmd  # noqa: E402,F401  (registers likelihood, sweep, anomaly)
from meddiff.cli import models_cmd  # noqa: E402,F401  (registers models)
from meddiff.cli import devstack_cmd  # noqa: E402,F401  (registers dev-stack start|stop|status)
from meddiff.cli import autoencoder_cmd  # noqa: E402,F401  (registers train-autoencoder, encode)


# every write is atomic and every stage resumes (README, "Reliability"), so this holds wherever Ctrl-C lands
STOPPED = ("stopped before the command finished; what it had finished is kept and nothing is left half-written: "
           "re-run the same command to go on")


def in_flags(message: str, argv: list[str]) -> str:
    """``message`` with a leading config field named as the command line's option: configs (used from Python
    and from flows too) say ``steps must be positive``; the ``train`` command says ``--steps must be ...``."""
    field, _, rest = message.partition(" ")
    if not rest.startswith("must "):  # only "<field> must ...": other messages may start with any word
        return message
    cmd = typer.main.get_command(app)  # typer's own click: read by duck typing, not isinstance
    params = list(cmd.params)
    for arg in argv:  # down the command path: global options, then each (sub)command's
        sub = getattr(cmd, "commands", {}).get(arg)
        if sub is not None:
            cmd = sub
            params += cmd.params
    for p in params:
        flags = [o for o in p.opts if o.startswith("--")]
        if p.name == field and flags:
            return f"{max(flags, key=len)} {rest}"
    return message


def main() -> None:
    from meddiff.errors import Interrupted, MeddiffError

    try:
        app()
    except Interrupted as e:  # Ctrl-C where the work can resume: say where, exit as SIGINT does
        typer.secho(f"interrupted: {e}", fg="yellow", err=True)
        sys.exit(130)
    except MeddiffError as e:
        typer.secho(f"error: {in_flags(str(e), sys.argv[1:])}", fg="red", err=True)
        sys.exit(2)
    except Exception as e:
        from meddiff.storage import remote_error

        line = remote_error(e)  # the object store refused or was not there: what to fix, not botocore's traceback
        if line is None:
            raise
        typer.secho(f"error: {line}", fg="red", err=True)
        sys.exit(2)
    except SystemExit as e:
        if e.code == 130:  # typer's silent answer to a Ctrl-C that no stage turned into an Interrupted
            typer.secho(f"interrupted: {STOPPED}", fg="yellow", err=True)
        raise
