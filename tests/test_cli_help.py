"""The CLI's own help: what a new user reads first."""
from __future__ import annotations

import pytest
import typer.main

from meddiff.cli import app


def _commands(command, path=()):
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, path + (name,))
    if path:
        yield " ".join(path), command


def test_every_command_summary_is_one_line():
    """The first paragraph of a command's help is its line in `meddiff --help`; a line break in it
    shows up as a broken line in the middle of the command list."""
    commands = dict(_commands(typer.main.get_command(app)))
    assert {"calibrate", "cohorts regenerate", "train", "pipeline"} <= commands.keys()
    broken = {name: c.help.split("\n\n")[0] for name, c in commands.items()
              if "\n" in (c.help or "").strip().split("\n\n")[0]}
    assert not broken, broken
    missing = [name for name, c in commands.items() if not (c.help or "").strip()]
    assert not missing, missing


def test_every_argument_and_option_says_what_it_is():
    commands = dict(_commands(typer.main.get_command(app)))
    bare = [f"{name} {p.name}" for name, c in commands.items() for p in c.params
            if p.name != "help" and not (getattr(p, "help", None) or "").strip()]
    assert not bare, bare


def test_help_and_listings_do_not_load_torch_or_monai():
    """`meddiff --help` took 10.2 s on a 2-core CPU (every command module imported torch and MONAI at
    import time), now 0.5 s: the heavy libraries load inside the commands that use them."""
    import subprocess
    import sys

    code = ("import sys; from typer.main import get_command; from meddiff.cli import app; get_command(app); "
            "print(sorted(m for m in ('torch', 'monai', 'pandas', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_config_errors_name_the_option_the_user_typed(tmp_path):
    """A config names its field (``steps must be positive``: the same config is built from Python and from
    flows); the command line says which option that is, including a sub-command's own and renamed ones."""
    import subprocess
    import sys

    from meddiff.cli import in_flags

    res = subprocess.run([sys.executable, "-m", "meddiff", "train", "nowhere", "--steps", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == "error: --steps must be positive, not 0"
    train = ["train", "ds", "--batch-size", "-2"]
    assert in_flags("batch_size must be positive, not -2", train) == "--batch-size must be positive, not -2"
    assert in_flags("label_dropout must be in [0, 1), not 2.0", train).startswith("--label-dropout must")
    assert in_flags("split must be train, val or test, not 'x'", ["likelihood", "m", "d"]).startswith("--split must")
    assert in_flags("threads must be at least 1", ["--threads", "0", "train"]).startswith("--threads must")
    # a word that is no option of this command, or a message that does not start with a field, is kept
    assert in_flags("steps must be positive, not 0", ["ingest", "x"]) == "steps must be positive, not 0"
    assert in_flags("mode must be one of a, b", []) == "mode must be one of a, b"
    assert in_flags("dataset x is not a dataset version", ["pipeline"]) == "dataset x is not a dataset version"
    # dev-stack's config says which field (it said "worker counts must be ≥ 0, ... --poll-seconds ≥ 1", an option
    # the command does not have); the command line names the option typed
    from meddiff.errors import MeddiffError
    from meddiff.ops.devstack import DevStackConfig

    for field, bad, typed in (("worker_limit", 0, "--worker-limit"), ("gpu_workers", -1, "--gpu-workers"),
                              ("poll_s", 0, None)):
        with pytest.raises(MeddiffError) as e:
            DevStackConfig(str(tmp_path), **{field: bad}).check()
        assert str(e.value).startswith(f"{field} must be ≥ "), e.value
        argv = ["dev-stack", "start", typed or "--state-dir", str(bad)]
        assert in_flags(str(e.value), argv).startswith(f"{typed or field} must be ≥ ")


def test_evaluate_refuses_bad_settings_before_reading_the_cohort(tmp_path):
    """Bad settings were found only after the cohort was opened and its report lock taken: a typo'd option
    waited behind a running evaluation, or was hidden behind a wrong path."""
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "no-cohort"), "--max-images", "1"])
    assert "max_images must be ≥ 2 (0 or None: all images), got 1" in str(res.exception)


def test_the_no_gpu_error_offers_only_switches_the_command_has(tmp_path):
    """`meddiff generate --device cuda` on a CPU machine advised "--allow-cpu-fallback", an option only
    `meddiff pipeline` has (generate answered "No such option"); the pipeline still offers it."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gen = subprocess.run([sys.executable, "-m", "meddiff", "train", "nowhere", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode != 0 and "no CUDA GPU is visible" in gen.stderr, gen.stderr[-2000:]
    assert "fallback" not in gen.stderr
    pipe = subprocess.run([sys.executable, "-m", "meddiff", "pipeline", "--dataset", "medmnist:breastmnist",
                           "--device", "cuda", "--storage", str(tmp_path / "storage")],
                          capture_output=True, text=True, timeout=300)
    assert pipe.returncode != 0 and "--allow-cpu-fallback" in pipe.stderr, pipe.stderr[-2000:]
