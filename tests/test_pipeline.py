"""The whole pipeline (ingest → train → generate → evaluate) on the real MedMNIST files.

- `meddiff pipeline` as a real command (its own ephemeral Prefect server, in a tmp PREFECT_HOME)
  on BloodMNIST with CI-sized knobs; a second run skips every stage.
- The `pipeline` flow on the session's Prefect harness with MEDDIFF_STORAGE=s3://... against
  moto's S3 server on loopback.
- Bad input: an unreachable storage endpoint, a GPU asked for without one, invalid configs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meddiff.errors import MeddiffError
from meddiff.devices import DeviceUnavailableError, resolve_device
from meddiff.pipeline import PipelineConfig

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parent.parent
# CI-sized: a few training steps, a few images per class, a light evaluation
SMALL = {"steps": 10, "preview_steps": 2, "per_class": 3, "sample_steps": 4, "eval_features": ["domain"], "eval_max_images": 60,
         "domain_steps": 20}


def cli_args(**knobs) -> list[str]:
    out = []
    for k, v in knobs.items():
        out += [f"--{k.replace('_', '-')}", ",".join(v) if isinstance(v, list) else str(v)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_lines(stdout: str) -> dict[str, str]:
    stages = {}
    for line in stdout.splitlines():
        name, _, rest = line.strip().partition(": ")
        if name in ("ingest", "train", "generate", "evaluate"):
            stages[name] = rest
    return stages


@pytest.mark.slow
def test_pipeline_command_end_to_end_then_skips_every_stage(medmnist_dir, tmp_path):
    storage = tmp_path / "storage"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDDIFF_", "AWS_"))}
    env.update(MEDMNIST_ROOT=str(medmnist_dir), MEDDIFF_STORAGE=str(storage), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [str(Path(sys.executable).parent / "meddiff"), "pipeline", "--dataset", "medmnist:bloodmnist",
           "--preset", "tiny", *cli_args(**SMALL), "--tstr"]

    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
    assert first.returncode == 0, first.stdout + first.stderr[-5000:]
    stages = stage_lines(first.stdout)
    assert list(stages) == ["ingest", "train", "generate", "evaluate"], first.stdout
    assert not any(s.startswith("skipped") for s in stages.values()), first.stdout
    report = Path(first.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report.is_file() and report.is_relative_to(storage)
    cohort = report.parent
    assert json.loads((cohort / "cohort.json").read_text())["counts"] == {c: 3 for c in json.loads(
        next(storage.glob("datasets/bloodmnist/*/dataset.json")).read_text())["class_names"]}
    tstr = json.loads(report.read_text())["tstr"]  # a complete report, with the utility --tstr asked for
    sentence = json.loads(report.read_text())["verdict"]["sentence"]  # the terminal says whether it is usable
    assert sentence.startswith(("Fit for use", "Not fit for use", "Not judged", "Judged in part"))
    assert first.stdout.strip().splitlines()[-2] == f"verdict: {sentence}"
    assert [s["setting"] for s in tstr["settings"]] == ["real", "real (equal size)", "synthetic", "real+synthetic"]
    model_card = json.loads(next(storage.glob("models/*/model.json")).read_text())
    assert model_card  # the trained model's record
    # the stage logs went through Prefect's run logger
    assert "Flow run" in first.stderr + first.stdout and "train:" in first.stderr + first.stdout

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr[-5000:]
    again = stage_lines(second.stdout)
    assert list(again) == list(stages)
    for name, line in again.items():
        assert line.startswith("skipped (exists)"), second.stdout
        assert line.split()[-1] == stages[name].split()[-1]  # same outputs
    assert second.stdout.strip().splitlines()[-2:] == [f"verdict: {sentence}", f"report: {report}"]


@pytest.mark.slow
def test_pipeline_flow_on_s3_storage(prefect_harness, moto_s3, medmnist_dir):
    import s3fs

    from flows.pipeline import pipeline

    root = "s3://meddiff/ci"
    params = dict(dataset="medmnist:breastmnist", medmnist_root=str(medmnist_dir), preset="tiny", **SMALL)
    out = pipeline(**params, storage_root=root)
    assert [s["stage"] for s in out["stages"]] == ["ingest", "train", "generate", "evaluate"]
    assert not any(s["existed"] for s in out["stages"])
    for key in ("dataset_uri", "model_uri", "cohort_uri", "report_uri"):
        assert out[key].startswith(root + "/"), out
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    for uri, record in ((out["dataset_uri"], "dataset.json"), (out["model_uri"], "model.json"),
                        (out["cohort_uri"], "cohort.json")):
        assert fs.exists(f"{uri}/{record}"), uri
    assert out["verdict"] == json.loads(fs.cat(out["report_uri"]))["verdict"]["sentence"]

    again = pipeline(**params, storage_root=root)
    assert all(s["existed"] for s in again["stages"]), again
    assert again["report_uri"] == out["report_uri"] and again["verdict"] == out["verdict"]


def test_unreachable_storage_fails_fast_with_the_url(prefect_harness, monkeypatch):
    from flows.pipeline import pipeline

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    state = pipeline(dataset="medmnist:breastmnist", storage_root="s3://meddiff/unreachable", return_state=True)
    assert state.is_failed()
    assert endpoint in state.message and "after 3 attempts" in state.message, state.message
    with pytest.raises(MeddiffError, match="s3://meddiff/unreachable"):
        state.result()


def test_gpu_requested_without_gpu(prefect_harness, tmp_path):
    import torch

    from flows.pipeline import pipeline

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    state = pipeline(dataset="medmnist:breastmnist", device="cuda", storage_root=str(tmp_path), return_state=True)
    assert state.is_failed() and "no CUDA GPU" in state.message and "allow_cpu_fallback" in state.message
    with pytest.raises(DeviceUnavailableError):
        resolve_device("cuda")
    with pytest.warns(UserWarning, match="running on the CPU"):
        assert resolve_device("cuda", allow_cpu_fallback=True).type == "cpu"
    assert resolve_device("auto").type == "cpu"
    assert not list(tmp_path.rglob("*.json"))  # failed before any work


@pytest.mark.parametrize("bad, match", [
    (dict(mode="joint"), "mode must be one of"),
    (dict(device="tpu"), "device must be one of"),
    (dict(per_class=5, total=40), "exactly one of"),
    (dict(per_class=None), "exactly one of"),
    (dict(steps=0), "steps must be positive"),
    (dict(eval_max_images=1), "eval_max_images must be at least 2"),
    (dict(domain_steps=0), "domain_steps must be positive"),
    (dict(latent="vae", ae_steps=0), "ae_steps must be positive"),
    (dict(sample_steps=0), "sample_steps must be positive"),
    (dict(dataset="folder:scans", colour="gray"), "--colour must be one of auto, grey, rgb"),
    (dict(dataset="folder:scans", window="99,1"), "--window must be 'lo,hi' percentiles"),
    # found by the train stage, after ingest had written (and extracted 2.6 GB for BloodMNIST at 224 px)
    (dict(size=224), r"size must be one of \[28, 64, 96, 128\] for preset 'tiny', got 224"),
    (dict(size=96, latent="vae"), r"size must be one of \[28, 64, 128, 224\] for autoencoder preset 'tiny', got 96"),
])
def test_pipeline_config_rejects_bad_input(bad, match):
    """Each message names the field (a flow's parameter), which `meddiff pipeline` shows as its option:
    'eval-max-images must …' (no --, no field) was printed as it was."""
    from meddiff.cli import in_flags

    with pytest.raises(MeddiffError, match=match) as e:
        PipelineConfig(**bad).check()
    field = str(e.value).split()[0]
    if field in bad:
        assert in_flags(str(e.value), ["pipeline"]) == f"--{field.replace('_', '-')} {str(e.value).split(' ', 1)[1]}"


def test_pipeline_ingests_with_the_ingest_options_it_is_given(leukemia_zip, tmp_path):
    """`meddiff pipeline` could not pass --classes, --colour, --bit-depth or --window to its ingest stage."""
    from meddiff.data.ingest import ingest

    cfg = PipelineConfig(f"zip:{leukemia_zip}", classes="Original/Benign=benign,Original/Pro=pro", colour="grey",
                         window="1,99").check()
    card = ingest(cfg.ingest_config(), str(tmp_path)).card
    assert card["class_names"] == ["benign", "pro"] and card["channels"] == 1 and card["config"]["window"] == "1,99"


def test_pipeline_command_rejects_bad_input_before_running(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDDIFF_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([str(Path(sys.executable).parent / "meddiff"), "pipeline", "--mode", "joint",
                           "--storage", str(tmp_path / "storage")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "mode must be one of" in proc.stderr
    assert not (tmp_path / "storage").exists()


def test_pipeline_command_stops_on_bad_input_mid_run_without_a_traceback(tmp_path):
    """Bad input that only a stage finds (here ingest: a class folder with no images) printed Prefect's
    80-odd-line traceback of the failed flow run above the command's one-line error."""
    from PIL import Image

    for name in ("alpha", "beta"):
        (tmp_path / "src" / name).mkdir(parents=True)
    for i in range(3):
        Image.new("L", (28, 28), 40 * i).save(tmp_path / "src" / "alpha" / f"{i}.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDDIFF_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([str(Path(sys.executable).parent / "meddiff"), "pipeline", "--dataset",
                           f"folder:{tmp_path / 'src'}", "--storage", str(tmp_path / "storage")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no images found for class folder(s) ['beta']"), \
        proc.stderr[-3000:]
    assert "Encountered exception during execution: SourceError(\"no images found" in proc.stderr  # the run's log
    assert not list((tmp_path / "storage").glob("datasets/*/*/dataset.json"))


def test_pipeline_command_refuses_a_size_its_preset_cannot_train_before_ingesting(tmp_path):
    """--size 32 with the tiny preset: ingest wrote the dataset version, then train refused the size."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDDIFF_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([str(Path(sys.executable).parent / "meddiff"), "pipeline", "--dataset", "folder:.",
                           "--size", "32", "--storage", str(tmp_path / "storage")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == "error: --size must be one of [28, 64, 96, 128] for preset 'tiny', got 32"
    assert not (tmp_path / "storage").exists()


def test_a_dataset_the_evaluation_cannot_use_is_refused_before_training(medmnist_dir, tmp_path):
    """Ten real images per class leave 1 val image each side: the pipeline trained and generated, then
    the evaluation refused the dataset. It is refused right after ingest now; --no-evaluate runs on."""
    import numpy as np
    from PIL import Image

    from meddiff.pipeline import PipelineError, run_pipeline

    with np.load(medmnist_dir / "breastmnist.npz") as z:
        x, y = z["train_images"], z["train_labels"][:, 0]
    for label in (0, 1):
        (tmp_path / "src" / f"c{label}").mkdir(parents=True)
        for i in np.flatnonzero(y == label)[:5]:
            Image.fromarray(x[i]).save(tmp_path / "src" / f"c{label}" / f"{i}.png")
    cfg = PipelineConfig(f"folder:{tmp_path / 'src'}", size=28, steps=2, per_class=2, device="cpu")
    with pytest.raises(PipelineError, match=r"has 0 val images; .*: found before training; .*raise --val-frac / "
                                            r"--test-frac, or run with --no-evaluate"):
        run_pipeline(cfg, str(tmp_path / "st"))
    assert (tmp_path / "st" / "datasets").exists() and not (tmp_path / "st" / "models").exists()

    # the pipeline takes ingest's split options (it had none): 1 val and 2 test images per class pass the check
    class Trained(Exception):
        pass

    def call(stage, fn, *args):
        if stage == "train":
            raise Trained(args[0].dataset_uri)
        return fn(*args)

    wider = PipelineConfig(f"folder:{tmp_path / 'src'}", size=28, steps=2, per_class=2, device="cpu",
                           val_frac=0.2, test_frac=0.4, split_seed=3)
    with pytest.raises(Trained) as reached:
        run_pipeline(wider, str(tmp_path / "st"), call=call)
    from meddiff.data.shards import open_dataset

    card = open_dataset(str(reached.value)).card
    assert card["totals"] == {"train": 4, "val": 2, "test": 4}
    assert card["config"]["split_seed"] == 3
