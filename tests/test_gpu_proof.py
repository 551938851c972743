"""bench/gpu_proof.py runs end to end on the CPU with tiny settings, so the GPU proof script cannot rot
between the rare sessions that draw a GPU: every step writes its figures, re-runs skip finished steps,
and a training step stopped at its budget resumes in the next command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_proof.py"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.mark.slow
def test_gpu_proof_steps_run_resume_and_collect_on_cpu(medmnist_dir, tmp_path):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    work, out = tmp_path / "work", tmp_path / "out"
    common = ["--work", str(work), "--medmnist-root", str(medmnist_dir)]
    # a budget far too small to finish: the step stops the child, records nothing, and says how to resume
    first = run("train", *common, "--device", "cpu", "--preset", "tiny", "--train-steps", "5000",
                "--batch-size", "16", "--checkpoint-every", "10", "--budget-s", "25", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "run `train` again to resume" in first.stdout and not (work / "figures" / "train.json").exists()
    smoke = run("smoke", *common, "--out", str(out), env=env)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    figs = {p.stem: json.loads(p.read_text()) for p in (work / "figures").glob("*.json")}
    assert set(figs) == {"env", "tune", "train", "generate", "evaluate"}
    assert figs["tune"]["best"]["images_per_s"] > 0
    assert figs["train"]["steps"] == 12 and Path(figs["train"]["model_uri"]).is_dir()
    assert figs["generate"]["total"] == 16 and figs["generate"]["images_per_s"] > 0
    assert figs["evaluate"]["headline"]["label_fidelity"] is not None
    assert {"report.json", "report.html", "model-loss_curve.png", "figures-train.json"} <= {p.name for p in out.iterdir()}
    again = run("generate", *common, "--device", "cpu", env=env)
    assert again.returncode == 0 and "generate: done" in again.stdout  # finished steps are skipped


def test_pack_dry_run_lists_the_wheels_the_device_image_lacks():
    res = run("pack", "--dry-run", "--out", "/nonexistent")
    assert res.returncode == 0, res.stderr
    assert "monai==1.6.1" in res.stdout and "--python-version 3.12" in res.stdout
