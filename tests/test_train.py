"""Training on the real BloodMNIST / BreastMNIST versions: tiny preset, CPU, few steps."""

from __future__ import annotations

import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from meddiff.models import load_model
from meddiff.train.checkpoint import list_checkpoints, load_checkpoint
from meddiff.models.diffusion import build_scheduler, ddpm_target, min_snr_weight, scheduler_config
from meddiff.models.networks import build_network
from meddiff.train import TrainConfig, plan_run, train
from meddiff.models.networks import NetworkConfig

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_run_records(run: Path, class_ids: list[int], steps: int) -> dict:
    """The records every finished run folder holds, consistent with each other."""
    card = json.loads((run / "model.json").read_text())
    assert (run / "config.json").exists() and (run / "loss_curve.png").stat().st_size > 1000
    rows = metrics(run)
    assert rows[-1]["step"] == steps and all(r["images_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    assert sorted(p.name for p in (run / f"samples/step-{steps:07d}").glob("*.png")) == \
        sorted(f"class-{c}.png" for c in class_ids)
    ckpt = run / card["checkpoint"]
    from meddiff.records import sha256_file

    assert sha256_file(ckpt) == card["checkpoint_sha256"] and card["steps"] == steps
    assert card["param_count"] > 0 and card["wall_time_s"] > 0 and card["versions"]["monai"]
    return card


def loss_went_down(rows: list[dict]) -> bool:
    """The last logged loss (a mean over log_every steps) is well below the first."""
    return rows[-1]["loss"] < 0.85 * rows[0]["loss"]


# ------------------------------------------------------------------ losses and network (no data)

def test_v_target_matches_monai_velocity():
    sched = build_scheduler(scheduler_config("ddpm", "cosine", "v", 1000, 28))
    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    ours = ddpm_target(x0, eps, t, sched.alphas_cumprod, "v")
    assert torch.allclose(ours, sched.get_velocity(x0, eps, t), atol=1e-6)
    assert torch.equal(ddpm_target(x0, eps, t, sched.alphas_cumprod, "epsilon"), eps)


def test_min_snr_weight_clips_low_noise_steps_only():
    sched = build_scheduler(scheduler_config("ddpm", "linear", "epsilon", 1000, 28))
    w = min_snr_weight(torch.tensor([0, 999]), sched.alphas_cumprod, 5.0, "epsilon")
    assert w[0] < 0.01 and w[1] == pytest.approx(1.0)  # t=0: SNR ≫ γ is down-weighted; t=T-1: SNR < γ kept


@pytest.mark.parametrize("size", [28, 64, 96])
def test_four_level_network_takes_28_px_by_padding(size):
    net = build_network(NetworkConfig((8, 8, 16, 16), (False, False, False, True), 1, 8, 8), 1, None)
    x = torch.randn(2, 1, size, size)
    assert net(x, timesteps=torch.tensor([1, 900])).shape == x.shape


def test_label_dropout_uses_the_null_class_at_the_given_rate():
    from meddiff.train.step import drop_labels

    torch.manual_seed(0)
    y = torch.randint(0, 8, (20_000,))
    out = drop_labels(y, 0.1, null_class=8)
    dropped = out == 8
    assert 0.09 < dropped.float().mean() < 0.11 and torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, 8), y)


# ------------------------------------------------------------------ training runs on real data

@pytest.fixture(scope="module")
def blood_conditional(bloodmnist_uri, tmp_path_factory):
    cfg = TrainConfig(bloodmnist_uri, mode="conditional", steps=40, batch_size=32, device="cpu", log_every=5,
                      checkpoint_every=20, sample_every=20, preview_steps=5)
    return train(cfg, str(tmp_path_factory.mktemp("blood-cond")))


def test_tiny_conditional_bloodmnist(blood_conditional, bloodmnist_uri):
    run = Path(blood_conditional.uri)
    card = assert_run_records(run, list(range(8)), 40)
    assert card == blood_conditional.card and not blood_conditional.existed
    assert card["mode"] == "conditional" and card["null_class"] == 8 and card["num_class_embeds"] == 9
    assert card["dataset"]["uri"] == bloodmnist_uri and len(card["class_names"]) == 8 and card["channels"] == 3
    assert loss_went_down(metrics(run)), metrics(run)
    # the EMA network's loss on fixed val-split draws, on every checkpoint's row (and only there)
    val = {r["step"]: r["val_loss"] for r in metrics(run) if "val_loss" in r}
    assert sorted(val) == [20, 40] and all(0 < v < 10 for v in val.values()), val
    assert val[40] < val[20], val  # 20 more steps of a network far from converged: the EMA has moved down
    assert len(list_checkpoints(run)) == 2  # step 20 and 40, keep=2
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000020", "step-0000040"]  # every K


def test_tiny_per_class_bloodmnist(bloodmnist_uri, tmp_path):
    cfg = TrainConfig(bloodmnist_uri, mode="per-class", objective="rflow", steps=20, batch_size=16, device="cpu",
                      preview_steps=5, warmup_steps=5, log_every=5, checkpoint_every=10)
    group = Path(train(cfg, str(tmp_path)).uri)
    card = json.loads((group / "model.json").read_text())
    assert card["mode"] == "per-class" and sorted(card["parts"]) == [str(c) for c in range(8)]
    for c in range(8):
        part = assert_run_records(group / f"class-{c}", [c], 20)
        assert part["class_id"] == c and part["num_class_embeds"] is None
        assert card["checkpoint_sha256"][card["class_names"][c]] == part["checkpoint_sha256"]
        assert {r["class_id"] for r in metrics(group / f"class-{c}")} == {c}
        assert [r["step"] for r in metrics(group / f"class-{c}") if "val_loss" in r] == [10, 20]  # its class's val images
    assert all(loss_went_down(metrics(group / f"class-{c}")) for c in range(8))
    model = load_model(str(group))
    assert sorted(model.networks) == list(range(8)) and model.null_class is None


@pytest.mark.parametrize("mode,objective,extra", [
    ("conditional", "rflow", {}),
    ("per-class", "ddpm", {"prediction": "v", "schedule": "cosine", "min_snr_gamma": 5.0}),
])
def test_tiny_breastmnist_one_channel(breastmnist_uri, tmp_path, mode, objective, extra):
    cfg = TrainConfig(breastmnist_uri, mode=mode, objective=objective, steps=30, batch_size=16, device="cpu",
                      log_every=5, checkpoint_every=15, preview_steps=5, **extra)
    result = train(cfg, str(tmp_path))
    assert not result.existed and result.card["channels"] == 1
    runs = [Path(result.uri)] if mode == "conditional" else [Path(result.uri) / f"class-{c}" for c in (0, 1)]
    for run in runs:
        assert_run_records(run, [0, 1] if mode == "conditional" else [int(run.name[-1])], 30)
        assert loss_went_down(metrics(run)), metrics(run)
    model = load_model(result.uri)
    assert model.objective == objective and model.channels == 1 and model.image_size == 28
    sched = build_scheduler(model.scheduler_config)
    assert type(sched).__name__ == ("RFlowScheduler" if objective == "rflow" else "DDPMScheduler")
    if objective == "ddpm":
        assert sched.prediction_type == "v_prediction" and model.scheduler_config["schedule"] == "cosine"


def test_rerun_finds_the_finished_model(blood_conditional, bloodmnist_uri):
    run = Path(blood_conditional.uri)
    stamp = (run / "model.json").stat().st_mtime_ns
    root = str(run.parent.parent)
    again = train(TrainConfig(bloodmnist_uri, steps=40, batch_size=32, device="auto", log_every=7,
                              checkpoint_every=20), root)  # only operational fields differ
    assert again.existed and again.uri == blood_conditional.uri
    assert (run / "model.json").stat().st_mtime_ns == stamp
    other = plan_run(TrainConfig(bloodmnist_uri, steps=41, batch_size=32), root)
    assert other.uri != blood_conditional.uri  # the run id follows the weights-defining config


def test_the_same_training_writes_the_same_checkpoint_bytes_from_any_storage_root(breastmnist_uri, tmp_path):
    """Checkpoints held the wall time and the dataset's absolute path, so the same training written from
    two clones of a storage root (or after a move) had different sha256s, and so different cohort ids;
    and the thread-count request: the same weights trained by `meddiff pipeline` (threads picked: 2) and by
    `meddiff --threads 2 train` differed only in the checkpoint's config.cpu_threads (None vs 2)."""
    version = Path(breastmnist_uri)
    cards = []
    for root, threads in ((tmp_path / "a", {"cpu_threads": 1}), (tmp_path / "elsewhere" / "b", {})):
        uri = root / "datasets" / version.parent.name / version.name
        shutil.copytree(version, uri)
        cfg = TrainConfig(str(uri), steps=12, batch_size=16, device="cpu", log_every=4, checkpoint_every=6,
                          preview_steps=2, **threads)  # CPU kernels split work by thread count: 1 both times
        with pytest.MonkeyPatch.context() as mp:  # b: left to pick, and picks 1 (the checkpoint once held the request)
            mp.setenv("MEDDIFF_THREADS", "1")
            cards.append(train(cfg, str(root)).card)
    a, b = (Path(c["uri"]) for c in cards)
    assert a.name == b.name and a != b  # the same run id under two roots
    assert cards[0]["checkpoint_sha256"] == cards[1]["checkpoint_sha256"]
    assert (a / cards[0]["checkpoint"]).read_bytes() == (b / cards[1]["checkpoint"]).read_bytes()
    state = load_checkpoint(a / cards[0]["checkpoint"])
    assert state["config"]["dataset_version"] == version.name and "dataset_uri" not in state["config"]
    assert "wall_time_s" not in state  # it sits beside the checkpoint, in its session record
    records = sorted(p.name for p in (a / "checkpoints").glob("*.json"))
    assert records == ["step-0000006.json", "step-0000012.json"]
    session = json.loads((a / "checkpoints" / "step-0000012.json").read_text())
    assert session["step"] == 12 and 0 < session["wall_time_s"] <= cards[0]["wall_time_s"] + 0.01
    for sessions in (session["sessions"], cards[0]["sessions"]):  # the record's and the card's: one session
        assert [(s["steps"], s["cpu_threads"]) for s in sessions] == [([0, 12], 1)]


def test_card_names_the_cpu_threads_of_every_session_that_trained_the_weights(breastmnist_uri, tmp_path,
                                                                             monkeypatch):
    """CPU kernels' last bits follow the thread count, which meddiff sizes by the machine's load unless
    pinned, yet neither the card nor the checkpoint records said which count a run used: a user could
    not tell how to reproduce its weights, nor that a run resumed under another count never can be."""
    import meddiff.train.loop as loop
    from typer.testing import CliRunner

    from meddiff.cli import app

    calls, real_step = [], loop.train_step

    def crash_after_6(*args, **kwargs):
        if len(calls) == 6:
            raise RuntimeError("worker lost")
        calls.append(1)
        return real_step(*args, **kwargs)

    threads = torch.get_num_threads()
    cfg = TrainConfig(breastmnist_uri, steps=12, batch_size=8, device="cpu", log_every=3, checkpoint_every=6,
                      preview_steps=2, cpu_threads=2)
    try:
        monkeypatch.setattr(loop, "train_step", crash_after_6)
        with pytest.raises(RuntimeError, match="worker lost"):
            train(cfg, str(tmp_path))
        monkeypatch.setattr(loop, "train_step", real_step)
        monkeypatch.setenv("MEDDIFF_THREADS", "1")
        card = train(replace(cfg, cpu_threads=None), str(tmp_path)).card  # resumed at step 6, another count
    finally:
        torch.set_num_threads(threads)
    run = Path(card["uri"])
    first = json.loads((run / "checkpoints" / "step-0000006.json").read_text())["sessions"]
    assert [(s["steps"], s["device"], s["cpu_threads"], s["threads_source"]) for s in first] == \
        [([0, 6], "cpu", 2, "explicit")]
    last = json.loads((run / "checkpoints" / "step-0000012.json").read_text())["sessions"]
    for sessions in (card["sessions"], last):
        assert [(s["steps"], s["cpu_threads"], s["threads_source"]) for s in sessions] == \
            [([0, 6], 2, "explicit"), ([6, 12], 1, "MEDDIFF_THREADS")]
    shown = CliRunner().invoke(app, ["models", "show", str(run)], env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output
    assert ("steps 0–6 on cpu, 2 CPU threads (explicit); steps 6–12 on cpu, 1 CPU thread (MEDDIFF_THREADS) — "
            "trained under several CPU thread counts") in " ".join(shown.output.split())


_FORWARD = """
import sys, torch
from meddiff.models import load_model


def forward_all(uri):
    m = load_model(uri)
    x = torch.randn(4, m.channels, m.image_size, m.image_size, generator=torch.Generator().manual_seed(123))
    t = torch.tensor([0, 250, 600, 999])
    y = None if m.null_class is None else torch.tensor([0, 1, 0, m.null_class])
    return {str(k): net(x, timesteps=t, class_labels=y) for k, net in m.networks.items()}


if __name__ == "__main__":
    torch.save([forward_all(uri) for uri in sys.argv[2:]], sys.argv[1])
"""


def test_checkpoint_gives_identical_outputs_in_a_fresh_process(tiny_conditional_model_uri,
                                                                tiny_per_class_model_uri, tmp_path):
    script = tmp_path / "forward.py"
    script.write_text(_FORWARD)
    uris = [tiny_conditional_model_uri, tiny_per_class_model_uri]
    subprocess.run([sys.executable, str(script), str(tmp_path / "out.pt"), *uris], check=True,
                   env=SUBPROCESS_ENV, cwd=REPO, timeout=300)
    fresh = torch.load(tmp_path / "out.pt")
    sys.path.insert(0, str(tmp_path))
    try:
        from forward import forward_all
    finally:
        sys.path.remove(str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): CPU kernels split work by thread count
    try:
        here = [forward_all(uri) for uri in uris]
    finally:
        torch.set_num_threads(threads)
    assert [sorted(d) for d in fresh] == [["None"], [str(c) for c in range(len(load_model(uris[1]).class_names))]]
    for a, b in zip(fresh, here):
        for k in a:
            assert torch.equal(a[k], b[k]) and a[k].abs().sum() > 0
    net = load_model(uris[0]).networks[None]  # EMA weights, frozen, in eval mode
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_sigkill_then_resume_reaches_the_same_final_step(breastmnist_uri, tmp_path):
    args = [sys.executable, "-m", "meddiff.train", breastmnist_uri, "--steps", "60", "--batch-size", "16",
            "--checkpoint-every", "10", "--log-every", "5", "--keep", "2", "--device", "cpu", "--preview-steps", "2",
            "--storage", str(tmp_path)]
    run = Path(plan_run(TrainConfig(breastmnist_uri, steps=60, batch_size=16), str(tmp_path)).uri)
    proc = subprocess.Popen(args, env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not [p for p in list_checkpoints(run) if int(p.stem[5:]) >= 20]:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint at step 20 in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run / "model.json").exists()
    killed_at = max(int(r["step"]) for r in metrics(run))
    assert killed_at < 60
    for ckpt in list_checkpoints(run):  # whatever the kill interrupted, no checkpoint is partial
        load_checkpoint(ckpt)
    before = json.loads(list_checkpoints(run)[-1].with_suffix(".json").read_text())["wall_time_s"]

    out = subprocess.run(args, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(run)
    card = assert_run_records(run, [0, 1], 60)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(5, 61, 5))  # continuous: no gap, no duplicate
    assert all(r["loss"] < 3 for r in rows) and loss_went_down(rows)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000050.pt", "step-0000060.pt"]  # --keep 2
    assert sorted(p.name for p in (run / "checkpoints").glob("*.json")) == ["step-0000050.json", "step-0000060.json"]
    assert card["steps"] == 60 and card["wall_time_s"] > before > 0  # the killed session's time counts too


@pytest.mark.parametrize("command", [["train", "--preview-steps", "2"], ["train-autoencoder", "--kind", "vae"]])
def test_ctrl_c_checkpoints_at_the_step_and_says_how_to_resume(command, breastmnist_uri, tmp_path):
    """Ctrl-C used to exit 130 without a word, losing every step since the last periodic checkpoint."""
    name, *extra = command
    args = [str(Path(sys.executable).with_name("meddiff")), name, breastmnist_uri, *extra, "--steps", "400",
            "--batch-size", "16", "--checkpoint-every", "1000", "--log-every", "5", "--device", "cpu",
            "--storage", str(tmp_path)]
    proc = subprocess.Popen(args, env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(int(json.loads(line)["step"]) >= 20 for f in tmp_path.glob("*/*/metrics.jsonl")
                      for line in f.read_text().splitlines()):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no metrics row at step 20 in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    run = next(tmp_path.glob("*/*/metrics.jsonl")).parent
    (ckpt,) = list_checkpoints(run)  # the only checkpoint: the step Ctrl-C stopped at (the interval is 1000)
    step = int(ckpt.stem[5:])
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)  # denoiser or autoencoder checkpoint
    assert 20 <= step < 400 and saved["step"] == step and not (run / "model.json").exists()
    assert err.strip().splitlines()[-1] == (f"interrupted: stopped at step {step} of 400, its checkpoint saved: "
                                            f"re-run the same command to resume from step {step}")

    again = subprocess.run(args, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from its checkpoint at step {step} of 400 (--no-resume starts over)\n" in again.stderr
    assert [r["step"] for r in metrics(run)] == list(range(5, 401, 5))  # resumed there: no gap, no duplicate
    sessions = json.loads((run / "model.json").read_text())["sessions"]  # both sessions, OMP_NUM_THREADS=1
    assert [(s["steps"], s["cpu_threads"], s["threads_source"]) for s in sessions] == \
        [([0, step], 1, "OMP_NUM_THREADS"), ([step, 400], 1, "OMP_NUM_THREADS")]
    assert json.loads((run / "model.json").read_text())["steps"] == 400


def test_two_process_gloo_ddp_writes_once(breastmnist_uri, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "meddiff.train", breastmnist_uri,
           "--steps", "10", "--batch-size", "16", "--log-every", "2", "--checkpoint-every", "5", "--device", "cpu",
           "--preview-steps", "2",
           "--storage", str(tmp_path)]
    out = subprocess.run(cmd, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    uris = [line for line in out.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(uris) == 1  # only rank 0 prints
    run = Path(uris[0])
    card = assert_run_records(run, [0, 1], 10)
    assert card["world_size"] == 2
    assert [r["step"] for r in metrics(run)] == [2, 4, 5, 6, 8, 10]  # one row per logged step: rank 0 alone
    assert [p.name for p in list_checkpoints(run)] == ["step-0000005.pt", "step-0000010.pt"]
    assert not list((run / "checkpoints").glob(".*"))
    assert load_model(str(run)).networks[None](torch.zeros(1, 1, 28, 28), timesteps=torch.tensor([5]),
                                               class_labels=torch.tensor([1])).shape == (1, 1, 28, 28)


def test_cli_prints_the_model_uri(breastmnist_uri, tmp_path):
    from typer.testing import CliRunner

    from meddiff.cli import app

    res = CliRunner().invoke(app, ["train", breastmnist_uri, "--mode", "per-class", "--steps", "4",
                                   "--batch-size", "8", "--device", "cpu", "--preview-steps", "2",
                                   "--storage", str(tmp_path)])
    assert res.exit_code == 0, res.output
    uri = res.stdout.strip().splitlines()[-1]
    assert re.search(r"8/8 +\S+ loss \d\.\d+, images/s \d", res.stderr), res.stderr  # the bar shows the loss
    assert json.loads((Path(uri) / "model.json").read_text())["mode"] == "per-class"
    assert Path(uri).parent == tmp_path / "models" and Path(uri).name.startswith("breastmnist-per-class-tiny-")


def test_train_model_flow(prefect_harness, breastmnist_uri, tmp_path):
    from flows.train_model import train_model

    uri = train_model(breastmnist_uri, mode="per-class", steps=4, batch_size=8, device="cpu",
                      storage_root=str(tmp_path), parallel_classes=True)
    card = json.loads((Path(uri) / "model.json").read_text())
    assert card["mode"] == "per-class" and set(card["parts"]) == {"0", "1"}
    shutil.rmtree(Path(uri) / "class-1" / "samples")  # untouched by the re-run below: it finds the model
    assert train_model(breastmnist_uri, mode="per-class", steps=4, batch_size=8, device="cpu",
                       storage_root=str(tmp_path)) == uri
    assert not (Path(uri) / "class-1" / "samples").exists()



def test_train_model_flow_takes_the_commands_options(prefect_harness, breastmnist_uri, tmp_path):
    """The flow lacked `meddiff train`'s lr, flips, run name, network overrides, …: a deployment could not
    train what the command trains. They reach the model now, and a fanned-out part gets them too."""
    from flows.train_model import config_from, train_model
    from flows.train_part import part_parameters

    kw = dict(lr=5e-4, hflip=True, network_channels=[16, 32], attention_levels="none", label_dropout=0.2,
              keep=1, checkpoint_every=2, preview_steps=2)
    uri = train_model(breastmnist_uri, steps=4, batch_size=8, device="cpu", storage_root=str(tmp_path),
                      run_name="from-the-flow", **kw)
    card = json.loads((Path(uri) / "model.json").read_text())
    assert card["run_id"] == "from-the-flow"
    assert {k: card["config"][k] for k in ("lr", "hflip", "label_dropout", "keep")} == {
        "lr": 5e-4, "hflip": True, "label_dropout": 0.2, "keep": 1}
    assert tuple(card["network"]["channels"]) == (16, 32)
    assert len(list(Path(uri).rglob("checkpoints/*.pt"))) == 1
    cfg = config_from(dict(dataset_uri=breastmnist_uri, mode="per-class", **kw))
    assert config_from(part_parameters(cfg, str(tmp_path), "run")) == cfg


def test_per_class_parts_trained_side_by_side_in_threads_equal_those_trained_one_after_another(breastmnist_uri,
                                                                                               tmp_path):
    """``parallel_classes`` trains a per-class model's parts in threads of one process. Every part drew its
    noise, timesteps and initial weights from torch's one global generator, so its weights depended on how
    the threads interleaved: not reproducible, and not the model that training one part after another
    writes. Now each part trains on its own generator (initial weights: one part at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    from meddiff.train import finish_group, train_part

    cfg = TrainConfig(breastmnist_uri, mode="per-class", steps=24, batch_size=8, device="cpu", log_every=8,
                      checkpoint_every=12, preview_steps=2, cpu_threads=1)  # CPU kernels split work by thread count
    threads = torch.get_num_threads()
    try:
        one_by_one = train(cfg, str(tmp_path / "a")).card
        plan = plan_run(cfg, str(tmp_path / "b"))
        with ThreadPoolExecutor(2) as pool:
            assert all(card["steps"] == 24 for card in pool.map(lambda c: train_part(plan, c), plan.parts))
        side_by_side = finish_group(plan)
    finally:
        torch.set_num_threads(threads)
    assert len(set(one_by_one["checkpoint_sha256"].values())) == 2
    assert side_by_side["checkpoint_sha256"] == one_by_one["checkpoint_sha256"]


def test_loss_curves_drawn_by_threads_at_once_all_succeed(tmp_path):
    """``parallel_classes`` trains a per-class model's parts in threads; two parts finishing together
    crashed the flow inside matplotlib (one mathtext parser per process, for a log axis's tick labels:
    "ParseException: exception raised in parse action"; 25 of 40 curves failed with 4 threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from meddiff.train.records import write_loss_curve

    def draw(i: int) -> tuple[int, int]:
        run = tmp_path / f"part-{i}"
        run.mkdir()
        rows = [{"step": s, "loss": 0.9 * 0.97**s + 1e-3 * i} for s in range(1, 60)]  # log-scaled: mathtext ticks
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_loss_curve(run, f"part {i}")
        return Image.open(run / "loss_curve.png").size

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(draw, range(24))) == [(600, 350)] * 24


def test_s3_root_trains_uploads_and_resumes_from_the_bucket(medmnist_dir, moto_s3, monkeypatch, tmp_path):
    import s3fs

    from meddiff.data.ingest import IngestConfig, ingest

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # honour TMPDIR: the local work folder lands in tmp_path
    root = "s3://meddiff/ci"
    ds = ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir)), root).uri
    cfg = TrainConfig(ds, steps=4, batch_size=8, device="cpu", checkpoint_every=2, log_every=1, preview_steps=2)
    first = train(cfg, root)
    assert first.uri.startswith(root + "/models/breastmnist-conditional-tiny-")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    names = {p.rsplit("/", 1)[-1] for p in fs.find(first.uri)}
    assert {"model.json", "config.json", "metrics.jsonl", "loss_curve.png", "step-0000004.pt",
            "class-0.png"} <= names
    assert load_model(first.uri).checkpoint_sha256["model"] == first.card["checkpoint_sha256"]

    fs.rm(f"{first.uri}/model.json")  # as if killed after the last upload; local work folder lost too
    shutil.rmtree(tmp_path / "meddiff-train")
    again = train(cfg, root)
    assert not again.existed and again.card["checkpoint_sha256"] == first.card["checkpoint_sha256"]
    assert [json.loads(line)["step"] for line in fs.cat(f"{again.uri}/metrics.jsonl").decode().splitlines()] \
        == [1, 2, 3, 4]


def check_rank_and_worker_parts(uri: str, workers: int) -> None:
    """Ranks split the stream by sample, so their parts are equal whatever the shard sizes."""
    import hashlib

    from meddiff.data.shards import open_dataset
    from meddiff.train.batches import DataSpec, one_pass

    ds = open_dataset(uri)
    spec = DataSpec(num_workers=workers)

    def keys(rank: int, world: int) -> list[tuple[int, str]]:
        return [(y, hashlib.sha1(x.numpy().tobytes()).hexdigest()) for x, y in one_pass(ds, spec, 7, rank, world)]

    whole = keys(0, 1)
    parts = [keys(0, 2), keys(1, 2)]
    assert len(whole) == ds.card["totals"]["train"]
    assert sorted(parts[0] + parts[1]) == sorted(whole)
    assert abs(len(parts[0]) - len(parts[1])) <= max(workers, 1)
    assert whole != sorted(whole)  # shuffled
    per_class = DataSpec(class_id=1, num_workers=workers)
    assert {y for _, y in one_pass(ds, per_class, 7, 0, 1)} == {1}


@pytest.mark.parametrize("workers", [0, 1])
def test_ranks_and_workers_read_disjoint_equal_parts_that_cover_one_pass(workers, breastmnist_uri):
    if workers == 0:
        check_rank_and_worker_parts(breastmnist_uri, 0)
        return
    # DataLoader workers are forked: fork them from a fresh interpreter, not from this pytest process,
    # whose Prefect test server and thread pools make forking unsafe (a forked worker died here once)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_train as t; "
            f"t.check_rank_and_worker_parts({breastmnist_uri!r}, {workers})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
