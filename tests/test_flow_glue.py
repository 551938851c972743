"""The flows' glue without a server: progress lines a user can follow (loss, rate, ETA), metrics
handed through combined/throttled callbacks from the training loop, dataset tags, and user errors
phrased for deployment users."""

from __future__ import annotations

import logging

import pytest

from flows.common import LoggedProgress, dataset_tag, user_errors
from meddiff.errors import MeddiffError, SourceError
from meddiff.progress import combine, note, tell, throttled


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture()
def logger():
    log = logging.getLogger("test-flow-glue")
    handler = Lines()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield log, handler.lines
    log.removeHandler(handler)


def test_logged_progress_has_loss_rate_and_eta_and_is_throttled(logger, monkeypatch):
    log, lines = logger
    clock = iter([0.0, 1.0, 10.0, 40.0, 41.0])
    monkeypatch.setattr("flows.common.time.monotonic", lambda: next(clock))
    p = LoggedProgress(log, "train", every_s=30)
    callback = combine(p, None)
    callback(0, 100)            # t=0: first line
    note(callback, loss=0.5, images_per_s=320.0)
    callback(10, 100)           # t=1: throttled away
    callback(20, 100)           # t=10: throttled away
    callback(40, 100)           # t=40: 40 steps in 40 s → 1 step/s, 60 s left
    callback(100, 100)          # the end is always logged
    assert len(lines) == 3, lines
    assert lines[0] == "train: 0/100 (0%)"
    assert lines[1] == "train: 40/100 (40%), loss 0.5, images/s 320, 1 steps/s, ETA 1 min 00 s"
    assert lines[2].startswith("train: 100/100 (100%)") and "ETA" not in lines[2]


def test_unequal_stages_get_no_rate_or_eta_only_the_time_taken(logger, monkeypatch):
    """evaluate's 6 stages are far from equal: the pipeline logged 'ETA 10 min 10 s' 28 s before the end."""
    log, lines = logger
    clock = iter([0.0, 152.0, 180.0])
    monkeypatch.setattr("flows.common.time.monotonic", lambda: next(clock))
    p = LoggedProgress(log, "evaluate", " stages", every_s=30, even=False)
    p(1, 6)
    p(2, 6)   # t=152: the slow stage done
    p(6, 6)   # t=180
    assert lines == ["evaluate: 1/6 stages (17%)", "evaluate: 2/6 stages (33%)",
                     "evaluate: 6/6 stages (100%), in 3 min 00 s"]


def test_told_lines_pass_through_combined_and_throttled_callbacks_to_the_flow_log(logger):
    """What the library tells its user (resuming, waiting on another builder) reaches a flow's run log."""
    log, lines = logger
    callback = combine(throttled(LoggedProgress(log, "train"), 60.0), None)
    tell(callback, "resuming from its checkpoint at step 131 of 300 (--no-resume starts over)")
    tell(None, "dropped: no callback")
    assert lines == ["train: resuming from its checkpoint at step 131 of 300 (--no-resume starts over)"]


def test_training_loop_notes_reach_the_flow_callback(breastmnist_uri, tmp_path):
    """A real (tiny) training run hands its loss and images/s to the callback at its log cadence."""
    from meddiff.train import TrainConfig, train

    seen = []

    class Recorder:
        def __call__(self, done, total):
            pass

        def note(self, **metrics):
            seen.append(metrics)

    cfg = TrainConfig(breastmnist_uri, preset="tiny", steps=10, batch_size=8, device="cpu", preview_steps=2)
    train(cfg, str(tmp_path), combine(throttled(Recorder(), 60.0)))
    assert len(seen) == 1  # log_every=10 for tiny: step 10
    assert all(m["loss"] > 0 and m["images_per_s"] > 0 for m in seen)


@pytest.mark.parametrize("uri, tag", [
    ("medmnist:bloodmnist", "dataset:bloodmnist"),
    ("/x/storage/datasets/bloodmnist/abc123", "dataset:bloodmnist"),
    ("s3://b/p/datasets/leukemia/v1", "dataset:leukemia"),
    ("/x/storage/models/bloodmnist-conditional-tiny-1a2b", "dataset:bloodmnist"),
    ("/x/storage/cohorts/breastmnist-per-class-tiny-1a2b-9f", "dataset:breastmnist"),
    # sources are tagged with the name ingest gives them (were 'kaggle', 'chest' and 'unknown')
    ("zip:../shared/datasets/kaggle/leukemia-sample.zip", "dataset:leukemia-sample"),
    ("folder:~/scans/chest-xray/", "dataset:chest-xray"),
    ("kaggle:mehradaria/leukemia", "dataset:leukemia"),
])
def test_dataset_tag(uri, tag):
    assert dataset_tag(uri) == tag


def test_user_errors_speak_of_parameters_in_deployment_runs(monkeypatch):
    from prefect import runtime

    msg = "bloodmnist.npz: Offline? Put it in a folder and pass --medmnist-root DIR"
    with pytest.raises(SourceError, match="pass --medmnist-root DIR"):  # the CLI (no deployment): unchanged
        with user_errors():
            raise SourceError(msg)
    monkeypatch.setattr(runtime.deployment, "id", "d1b0c0de")
    with pytest.raises(SourceError) as info:
        with user_errors():
            raise SourceError(msg)
    assert "--param medmnist_root=DIR (or MEDMNIST_ROOT in the worker's environment)" in str(info.value)
    assert "--medmnist-root" not in str(info.value)
    from meddiff.generate import CohortSpec

    with pytest.raises(MeddiffError) as info:  # per_class from the deployment's defaults + total from the user
        with user_errors():
            CohortSpec("s3://b/models/m", per_class=50, total=1000).check()
    assert "--param per_class=null" in str(info.value) and "--per-class" not in str(info.value)


def test_cancelled_training_leaves_only_resumable_state(breastmnist_uri, tmp_path):
    """The cancellation hook keeps a run folder with a checkpoint and removes one without any."""
    from pathlib import Path
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.train_model import leave_resumable, train_model
    from meddiff.train import TrainConfig, plan_run

    params = dict(dataset_uri=breastmnist_uri, steps=5, batch_size=8, device="cpu", storage_root=str(tmp_path))
    run = FlowRun(flow_id=uuid4(), parameters=params, name="cancelled-run")
    folder = Path(plan_run(TrainConfig(breastmnist_uri, steps=5, batch_size=8, device="cpu"), str(tmp_path)).uri)
    (folder / "samples").mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # started, killed before its first checkpoint
    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: False}):
        leave_resumable(train_model, run, None)
        assert not folder.exists()
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "step-100.pt").write_bytes(b"x")
        leave_resumable(train_model, run, None)
    assert (folder / "checkpoints" / "step-100.pt").exists()


def test_empty_uri_parameters_fail_with_one_clear_line():
    from flows.common import required
    from meddiff.errors import MeddiffError

    with pytest.raises(MeddiffError, match=r"model_uri is empty: pass --param model_uri=<URI>.*meddiff models list"):
        required(" ", "model_uri", "train-model")
    assert required("storage/models/x", "model_uri", "train-model") == "storage/models/x"


def test_logged_progress_says_the_end_once(logger):
    log, lines = logger
    p = LoggedProgress(log, "ingest", " images")
    p(500, 1000)
    p(1000, 1000)
    p(1000, 1000)  # ingest reports its total twice
    assert len(lines) == 2 and lines[-1].startswith("ingest: 1000/1000 images (100%)")


def test_a_failure_logs_one_traceback_and_a_ctrl_c_none():
    """A task's failure is logged with its traceback once (not again by its flow); Ctrl-C (Interrupted) is
    the user stopping the run, not a failure to debug: `meddiff pipeline` printed ~90 lines of traceback."""
    import io

    from flows.common import one_traceback_per_failure
    from meddiff.errors import Interrupted

    one_traceback_per_failure()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    kept = [(log.handlers, log.propagate) for log in loggers]
    for log in loggers:  # to this handler alone (not to Prefect's API handler: no flow run here)
        log.handlers, log.propagate = [handler], False
    try:
        for exc in (ValueError("a bug"), Interrupted("stopped at step 77 of 800, its checkpoint saved")):
            try:
                raise exc
            except Exception as e:  # noqa: BLE001
                for log in loggers:  # the task's log, then its flow's, each with the exception
                    log.error("Encountered exception during execution: %r", e, exc_info=True)
    finally:
        for log, (handlers, propagate) in zip(loggers, kept):
            log.handlers, log.propagate = handlers, propagate
    text = out.getvalue()
    assert text.count("Traceback (most recent call last)") == 1 and text.count("ValueError: a bug") == 1
    assert text.count("Interrupted('stopped at step 77") == 2  # its lines, without a traceback


def test_deploy_refuses_unknown_names_and_an_unreachable_api_before_changing_anything(tmp_path, monkeypatch):
    """`meddiff deploy --name nosuch` created both work pools and then failed with prefect's "An entrypoint
    must be provided"; an unreachable PREFECT_API_URL failed with a 40-line httpx traceback. Both are
    now one line naming the fix, and nothing runs on a server before them."""
    import socket
    from pathlib import Path

    from meddiff.ops import deploy as d

    calls = []
    monkeypatch.setattr(d, "_prefect", lambda args, *a: calls.append(args) or "")
    repo = Path(__file__).resolve().parent.parent
    names = d.deployment_names(repo / "prefect.yaml")
    assert {"pipeline/default", "pipeline/nightly", "generate-shard/default", "train-model/default"} <= set(names)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    for bad in (("nosuch",), ("pipeline/default", "nosuch/default"), ("default",)):
        with pytest.raises(d.DeployError, match=r"no deployment .* give --name as flow/deployment, one of: "):
            d.deploy(d.DeployConfig(str(repo / "prefect.yaml"), api_url=dead, names=bad))
    with pytest.raises(d.DeployError, match=f"cannot reach the Prefect API at {dead} .*start the server"):
        d.deploy(d.DeployConfig(str(repo / "prefect.yaml"), api_url=dead, names=("pipeline/nightly",)))
    assert calls == []
