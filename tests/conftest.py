"""Shared fixtures. Ray tests run on a real local Ray with 2 CPUs (no mocks)."""

import os
from pathlib import Path

import pytest

# Before ray is imported anywhere: no auth token files in tests, fast report() hand-offs, no doubled prints.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "cifar10"


def pytest_collection_modifyitems(items):
    for item in items:  # a test on the session's Ray is a Ray test, marked or not
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Decoded-array cache for the whole test session, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["RAY_RESNET_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def real_cifar_small(tmp_path_factory, cache_dir):
    """A small slice of the real CIFAR-10 parquet (first 1,024 train / 500 test rows), in the same layout."""
    if not (SHARED_CIFAR / "train.parquet").is_file():
        pytest.skip(f"real CIFAR-10 parquet not found at {SHARED_CIFAR}")
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("cifar10_small")
    for split, rows in (("train", 1024), ("test", 500)):
        table = pq.ParquetFile(SHARED_CIFAR / f"{split}.parquet").iter_batches(batch_size=rows)
        pq.write_table(__import__("pyarrow").Table.from_batches([next(table)]), root / f"{split}.parquet")
    return root


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with the bucket `ray-resnet`; `s3.env` holds the client settings."""
    from s3_server import BUCKET, S3Server

    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process as an S3 client of `s3` (for code that runs here, not in a subprocess)."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3
