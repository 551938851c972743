"""Ctrl-C where no stage speaks: while the command loads, and inside a command before any stage has
turned it into its own 'interrupted: …' line (those are tested with each stage)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_ctrl_c_while_the_command_loads_says_nothing_was_done(tmp_path):
    """It used to print a 20–50 line traceback from inside torch's or fsspec's import."""
    meddiff = Path(sys.executable).with_name("meddiff")
    proc = subprocess.Popen([str(meddiff), "models", "list", "--storage", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    time.sleep(0.5)  # loading torch and Prefect takes seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err, out) == (130, "interrupted while starting: nothing was done\n", "")


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
