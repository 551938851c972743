"""Storage: the download cache of remote objects never serves another endpoint's or an old version's bytes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time


from meddiff import storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_local_cache_is_keyed_by_endpoint_and_object_version(moto_s3, monkeypatch, tmp_path):
    import boto3

    # a second S3 server in its own process (moto servers in one process share one store)
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        other_endpoint = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=other_endpoint).create_bucket(Bucket="meddiff")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        uri, cache = "s3://meddiff/x/model.json", tmp_path / "cache"

        storage.write_bytes(uri, b"first endpoint")
        assert storage.fetch_local(uri, cache).read_bytes() == b"first endpoint"
        monkeypatch.setenv("AWS_ENDPOINT_URL", other_endpoint)  # same bucket and path, another server
        storage.write_bytes(uri, b"second endpoint, other bytes")
        assert storage.fetch_local(uri, cache).read_bytes() == b"second endpoint, other bytes"
        storage.write_bytes(uri, b"rewritten in place")  # same endpoint, same path, new object
        assert storage.fetch_local(uri, cache).read_bytes() == b"rewritten in place"
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
        assert storage.fetch_local(uri, cache).read_bytes() == b"first endpoint"
    finally:
        other.kill()
        other.wait()


def test_fetch_local_returns_local_paths_untouched(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"x")
    assert storage.fetch_local(str(p)) == p


def test_dataset_root_is_the_root_above_datasets_name_version_and_none_elsewhere(tmp_path):
    """Calibration and the domain-classifier cache sit under a dataset's storage root: both found it by
    hand-written index arithmetic, now by this one rule."""
    from meddiff.evaluate.calibrate import CalibrationConfig, calibration_uri
    from meddiff.evaluate.features import DomainTrainConfig, domain_cache_uri

    assert storage.dataset_root(f"{tmp_path}/st/datasets/bloodmnist/abc123/") == f"{tmp_path}/st"
    assert storage.dataset_root("s3://bucket/prefix/datasets/bloodmnist/abc123") == "s3://bucket/prefix"
    assert storage.dataset_root(f"{tmp_path}/elsewhere/bloodmnist/abc123") is None
    assert domain_cache_uri(f"{tmp_path}/st/datasets/b/v", DomainTrainConfig()).startswith(
        f"{tmp_path}/st/cache/domain-classifier/b/v/")
    assert domain_cache_uri(f"{tmp_path}/x/b/v", DomainTrainConfig()).startswith(
        f"{tmp_path}/x/b/.meddiff-cache/domain-classifier/b/v/")
    assert calibration_uri("s3://bucket/datasets/b/v", CalibrationConfig()).startswith("s3://bucket/calibration/b/v/")
    assert calibration_uri(f"{tmp_path}/x/b/v", CalibrationConfig()).startswith(f"{tmp_path}/x/b/calibration/b/v/")


def test_an_object_store_that_refuses_or_is_not_there_is_one_line_saying_what_to_fix(s3_server, monkeypatch,
                                                                                    capsys):
    """`meddiff models list` (datasets, cohorts alike) with a wrong secret key printed botocore's 75-line
    traceback ending 'PermissionError: Forbidden', exit status 1; with AWS_ENDPOINT_URL on a port where no
    server listens, 131 lines. Each is now one line naming the server's answer and the variable to fix;
    and a list of a bucket that does not exist says so instead of printing an empty table."""
    import pytest
    import s3fs

    from meddiff.cli import main

    endpoint, _ = s3_server
    monkeypatch.setattr(sys, "argv", ["meddiff", "models", "list", "--storage", "s3://meddiff/x"])

    def run() -> str:
        s3fs.S3FileSystem.clear_instance_cache()  # a client made with other keys is not reused
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    # a mistyped bucket listed nothing, exit status 0, not a word: now stderr says why the list is empty
    monkeypatch.setattr(sys, "argv", ["meddiff", "models", "list", "--storage", "s3://no-such-bucket/x"])
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    assert capsys.readouterr().err.strip() == (f"no models under s3://no-such-bucket/x: bucket no-such-bucket does "
                                               f"not exist at {endpoint} (check --storage / MEDDIFF_STORAGE)")
    # an artifact URI in a mistyped bucket: 'does not exist' alone did not say that the bucket is what is missing
    from meddiff.data.shards import open_dataset
    from meddiff.errors import ArtifactError

    with pytest.raises(ArtifactError) as e:
        open_dataset("s3://no-such-bucket/datasets/d/v").card
    assert str(e.value) == (f"s3://no-such-bucket/datasets/d/v does not exist: bucket no-such-bucket does not exist "
                            f"at {endpoint} (check the URI, and AWS_ENDPOINT_URL)")
    with pytest.raises(ArtifactError) as e:
        open_dataset("s3://meddiff/datasets/d/v").card
    assert str(e.value) == "s3://meddiff/datasets/d/v does not exist"  # the bucket is there
    monkeypatch.setattr(sys, "argv", ["meddiff", "models", "list", "--storage", "s3://meddiff/x"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    assert run().endswith(f"the S3 server at {endpoint} refused these credentials: check AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (and that they may use the bucket)")
    nobody = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", nobody)
    assert run().endswith(f"no S3 server answers at {nobody}: start it, or point AWS_ENDPOINT_URL at it")
    s3fs.S3FileSystem.clear_instance_cache()
