"""Shared fixtures. Ray tests run on a real local Ray with 2 CPUs (no mocks)."""

import os
import time
from pathlib import Path

import pytest

from fixtures import FINISHED_RUN_EPOCHS, FINISHED_RUN_LOG_EVERY_STEPS, still_running_at, train_controller_pids

# Before ray is imported anywhere: no auth token files in tests, fast report() hand-offs, no doubled prints.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "cifar10"


def pytest_report_header(config):
    """The CPU and the precision it trains in head every run's log: tolerances and timings depend on both."""
    import torch

    from ray_resnet.core.precision import training_precision
    from ray_resnet.io.environment import cpu_model

    return (f"cpu: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
            f"perf.amp auto trains in {training_precision(torch.device('cpu'), 'auto')} here")


def pytest_collection_modifyitems(items):
    for item in items:  # a test on the session's Ray is a Ray test, marked or not
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


def pytest_runtest_setup(item):
    """Tests marked `gpu` need a CUDA GPU in this process; elsewhere they are skipped, not failed."""
    import torch

    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (marked gpu)")


@pytest.fixture
def torch_sees_no_gpu(monkeypatch):
    """Code that picks CUDA where torch sees a GPU (`ray-resnet eval`) runs on the CPU, as the CPU results it is
    compared with did, also on a machine with a GPU (whose TF32 convolutions round otherwise)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # With its dashboard, as `ray-resnet` starts Ray: Ray Train's placement-group cleaner asks the dashboard's State
    # API whether a controller died, and without it never frees the CPUs of a trial Tune stopped.
    # num_gpus=0: the tests mean CPU workers; on a machine with a GPU Ray would detect it, and `run.device: auto`
    # would then train on CUDA. Tests that need a GPU are marked `gpu` and start their own Ray.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def releases_its_placement_groups(request):
    """A test on the session's Ray leaves no placement group behind: a leaked one holds CPUs that every later
    worker group then waits for, forever (a stopped trial's workers must be released). A leak fails the test that
    left it, and is then removed, so the tests after it run on a clean cluster."""
    if "ray_local" not in request.fixturenames:
        yield
        return
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup, PlacementGroupID

    before, controllers_before = set(placement_group_table()), set(train_controller_pids())
    yield
    deadline = time.monotonic() + 30  # Ray Train's placement-group cleaner polls its controller every few seconds
    # A controller whose trial Tune stopped is marked dead at once but its process can still retry for a moment and
    # create a worker group: its placement group is this test's, so wait for the process to be gone first.
    still_running_at(set(train_controller_pids()) - controllers_before, deadline)
    while (held := _held_placement_groups(placement_group_table(), before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pg_id in held:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
    assert not held, f"placement groups still held after the test: {held}"


def _held_placement_groups(table: dict, before: set[str]) -> dict[str, str]:
    return {pg_id: f"{pg['state']} {pg['bundles']}" for pg_id, pg in table.items()
            if pg_id not in before and pg["state"] != "REMOVED"}


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
def finished_run(ray_local, real_cifar_small, tmp_path_factory):
    """The run dir of one finished run on the session's Ray (fixtures.FINISHED_RUN_*), trained once for the tests
    that only read what a run leaves (they copy it before changing anything)."""
    from ray_resnet.config import load_config
    from ray_resnet.raytrain.driver import run_training

    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [f"data.root={real_cifar_small}", f"run.storage={storage}", "run.name=served",
                             f"schedule.epochs={FINISHED_RUN_EPOCHS}", "schedule.warmup_epochs=0",
                             "schedule.milestones=[]", "data.train_subset=256", "data.test_subset=200",
                             "optim.batch_size=64", "optim.lr=0.05", "perf.eval_batch_size=200",
                             f"run.log_every_steps={FINISHED_RUN_LOG_EVERY_STEPS}"])
    assert run_training(cfg).epoch == FINISHED_RUN_EPOCHS
    return storage / "served"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with the bucket `ray-resnet`; `s3.env` holds the client settings."""
    from s3_server import BUCKET, S3Server

    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_data(s3, real_cifar_small):
    """The real CIFAR-10 slice, uploaded: a data.root that exists only in S3."""
    from ray_resnet.io import storage

    from s3_server import BUCKET

    with pytest.MonkeyPatch.context() as patch:  # the upload runs in this process
        for key, value in s3.env.items():
            patch.setenv(key, value)
        storage.upload_dir(real_cifar_small, f"s3://{BUCKET}/cifar10-small")
    return f"s3://{BUCKET}/cifar10-small"


@pytest.fixture(scope="session")
def two_node_runs(real_cifar_small, s3, s3_data, tmp_path_factory):
    """The two-node scenarios of cluster_scenarios.py that tests only read, run once on one simulated cluster (it
    starts once, not once per test): SPREAD workers (a local run dir), the same with data and run dir only in S3,
    and a run whose second node is removed mid-run (last: it takes the node). Each scenario's result by name."""
    from cluster_scenarios import run_scenarios
    from s3_server import BUCKET

    local = tmp_path_factory.mktemp("two-node-runs")
    return run_scenarios([("spread", real_cifar_small, local), ("s3", s3_data, f"s3://{BUCKET}/cluster"),
                          ("remove_node", real_cifar_small, local)], env=s3.env)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process as an S3 client of `s3` (for code that runs here, not in a subprocess)."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3
