"""Ctrl-C where no stage speaks: while the command loads, and inside a command before any stage has
turned it into its own 'interrupted: …' line (those are tested with each stage)."""

from __future__ import annotations

import subprocess
import sys

import pytest

LOADING_INTERRUPTED = """
import os, signal, sys


class CtrlCWhileLoading:
    def find_spec(self, name, path=None, target=None):
        if name == "meddiff.cli.models_cmd":  # a command module is being imported: the CLI is loading
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlCWhileLoading())
sys.argv = ["meddiff", "models", "list", "--storage", sys.argv[1]]
from meddiff.command import main

main()
"""


def test_ctrl_c_while_the_command_loads_says_nothing_was_done(tmp_path):
    """It used to print a 20–50 line traceback from inside torch's or fsspec's import. The SIGINT is sent
    while the CLI's modules import (loading takes 0.3 s now, too short to hit with a timer)."""
    proc = subprocess.run([sys.executable, "-c", LOADING_INTERRUPTED, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "interrupted while starting: nothing was done\n", "")


def test_ctrl_c_that_no_stage_caught_is_told_not_silent(tmp_path, monkeypatch, capsys):
    """typer turns such a KeyboardInterrupt into a silent exit 130."""
    from meddiff import storage
    from meddiff.cli import main

    def interrupted(uri):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "listdir", interrupted)
    monkeypatch.setattr(sys, "argv", ["meddiff", "datasets", "list", "--storage", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == ("interrupted: stopped before the command finished; what it had finished is "
                                       "kept and nothing is left half-written: re-run the same command to go on\n")
