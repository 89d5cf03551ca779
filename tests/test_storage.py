"""Run dirs, sweeps and data in S3, against a real S3 endpoint on 127.0.0.1 (moto's server, started by the tests
and stopped by its pid; no mocked filesystem). Runs go through the `ray-resnet` command in subprocesses that hold
the client settings in their environment, as a user's shell would."""

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ray_resnet.apps import cli
from ray_resnet.apps.report import read_curve
from ray_resnet.config import Config, read_config, save_config
from ray_resnet.core.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from ray_resnet.core.datasets import load_cifar
from ray_resnet.io import storage

from fixtures import own_lines, random_cifar, write_torchvision_cifar
from s3_server import BUCKET, S3Server

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_subset=256", "data.test_subset=200", "optim.batch_size=64", "schedule.warmup_epochs=0",
        "schedule.milestones=[]", "optim.lr=0.05", "perf.eval_batch_size=200", "run.log_every_steps=2"]


def _sets(*extra: str) -> list[str]:
    return [a for s in [*TINY, *extra] for a in ("--set", s)]


def ray_resnet(s3, cwd: Path, *argv: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """`ray-resnet ...` in a fresh process (its own embedded Ray) with the S3 settings in its environment."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **s3.env}
    env["CUDA_VISIBLE_DEVICES"] = ""  # its embedded Ray and torch see no GPU: a CPU run on any machine
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "ray_resnet", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# --- the storage layer itself, in this process ---------------------------------------------------------------

def test_files_checkpoints_and_configs_round_trip_through_s3(s3_env, tmp_path):
    base = f"s3://{BUCKET}/unit"
    storage.write_text(storage.join(base, "a", "note.txt"), "hello")
    assert storage.read_text(f"{base}/a/note.txt") == "hello" and storage.is_file(f"{base}/a/note.txt")
    assert storage.list_names(base) == ["a"] and storage.glob(base, "a/*.txt") == [f"{base}/a/note.txt"]
    assert storage.read_json(f"{base}/a/missing.json") is None
    save_config(Config(model="resnet32"), f"{base}/run/config.yaml")
    assert read_config(f"{base}/run/config.yaml").model == "resnet32"
    save_checkpoint(CheckpointState({}, {"model": "resnet20"}, 3), f"{base}/run/best")
    assert load_checkpoint(f"{base}/run").epoch == 3  # a run dir resolves to its best checkpoint
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1").write_bytes(b"x" * 1000)
    storage.upload_dir(tmp_path / "tb", f"{base}/run/tb")
    storage.download_dir(f"{base}/run/tb", tmp_path / "back")
    assert (tmp_path / "back" / "events.out.tfevents.1").read_bytes() == b"x" * 1000
    assert s3_env.keys("unit/run/") == ["unit/run/best/checkpoint.pt", "unit/run/config.yaml",
                                   "unit/run/tb/events.out.tfevents.1"]
    storage.remove(f"{base}/a/note.txt")
    assert not storage.exists(f"{base}/a/note.txt")


def _error(capsys, *argv: str) -> tuple[str, float]:
    start = time.monotonic()
    assert cli.main(list(argv)) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    return err[0], time.monotonic() - start


def test_bad_storage_is_one_line_within_30_s_before_anything_runs(s3_env, tmp_path, capsys, monkeypatch):
    train = ["train", "--data", str(tmp_path / "never-read"), "--name", "x"]
    line, seconds = _error(capsys, *train, "--storage", "s3://no-such-bucket/runs")
    assert "s3://no-such-bucket/runs" in line and "the bucket does not exist" in line and seconds < 30
    line, _ = _error(capsys, *train, "--storage", "foo://bucket/runs")
    assert "foo://bucket" in line and "pyarrow cannot open this kind of URI" in line
    line, _ = _error(capsys, *train, "--storage", "s3://AKIDEXAMPLE:supersecret@bucket/runs")
    assert "credentials in a URI" in line and "supersecret" not in line
    line, _ = _error(capsys, "sweep", "-c", str(REPO / "configs" / "sweep_table6.yaml"), "--storage",
                     "s3://no-such-bucket/sweeps", "--data", str(tmp_path))
    assert "s3://no-such-bucket/sweeps" in line and "the bucket does not exist" in line

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        line, seconds = _error(capsys, *train, "--storage", f"s3://{BUCKET}/runs")
    assert f"s3://{BUCKET}/runs: no answer from the object store in 20 s" in line and "AWS_ENDPOINT_URL" in line
    assert seconds < 30
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    line, seconds = _error(capsys, *train, "--storage", f"s3://{BUCKET}/runs")
    assert "cannot reach the object store" in line and seconds < 30
    assert not (tmp_path / "runs").exists()


def test_a_store_failing_for_seconds_is_ridden_out(s3_env, monkeypatch):
    from faulty_proxy import FaultyProxy

    proxy = FaultyProxy(s3_env.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    base = f"s3://{BUCKET}/flaky"
    try:
        written = ["kept.txt"]
        storage.write_text(f"{base}/kept.txt", "kept")
        for kind in ("503", "drop"):
            before = proxy.faulted[kind]
            proxy.fault(kind, 3)  # pyarrow's default 3 tries span about 2 s: this write would fail with them
            storage.write_text(f"{base}/{kind}.txt", kind)
            written.append(f"{kind}.txt")
            proxy.fault(kind, 3)
            assert storage.read_text(f"{base}/kept.txt") == "kept" and storage.list_names(base) == sorted(written)
            assert proxy.faulted[kind] - before >= 4  # both calls met the window and got through
    finally:
        proxy.stop()


def test_refused_and_missing_credentials_name_what_to_check(tmp_path, capsys, monkeypatch):
    guarded = S3Server(tmp_path / "moto-auth.log", auth=True)  # this one checks the keys it is given
    guarded.client().create_bucket(Bucket=BUCKET)
    try:
        for key, value in guarded.env.items():
            monkeypatch.setenv(key, value)
        line, seconds = _error(capsys, "train", "--data", str(tmp_path), "--storage", f"s3://{BUCKET}/runs")
        assert "access was refused: check the credentials" in line and guarded.env["AWS_SECRET_ACCESS_KEY"] not in line
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        line, _ = _error(capsys, "train", "--data", str(tmp_path), "--storage", f"s3://{BUCKET}/runs")
        assert "no AWS credentials are configured here" in line and "check the credentials" in line
    finally:
        guarded.stop()


# --- TensorBoard on a bucket: a local mirror of the event files ------------------------------------------------

def _event_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("events.out.*"))}


def test_the_mirror_copies_a_runs_event_files_then_only_what_grew(s3_env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from ray_resnet.io.eventmirror import Changes, sync_events

    local, run, mirror = tmp_path / "r0", f"s3://{BUCKET}/mirrored/r0", tmp_path / "mirror"
    (local / "best").mkdir(parents=True)
    (local / "best" / "checkpoint.pt").write_bytes(b"not an event file")
    epochs = SummaryWriter(str(local / "tb"))
    for epoch in (1, 2):
        epochs.add_scalar("test/acc", 10.0 * epoch, epoch)
    epochs.flush()
    storage.upload_dir(local, run)
    (epoch_file,) = _event_files(local / "tb")
    first = sync_events(run, mirror)
    assert first == Changes({f"tb/{epoch_file}": (local / "tb" / epoch_file).stat().st_size}, [])
    assert _event_files(mirror) == _event_files(local)  # the event files alone, at their relative paths
    assert not sync_events(run, mirror)  # nothing changed, nothing copied
    inode, size = (mirror / "tb" / epoch_file).stat().st_ino, (mirror / "tb" / epoch_file).stat().st_size

    epochs.add_scalar("test/acc", 30.0, 3)
    epochs.close()
    with SummaryWriter(str(local / "tb" / "steps")) as steps:
        steps.add_scalar("step/lr", 0.1, 50)
    storage.upload_dir(local, run)
    (steps_file,) = _event_files(local / "tb" / "steps")
    grown = (local / "tb" / epoch_file).stat().st_size - size
    second = sync_events(run, mirror)
    assert second.copied == {f"tb/{epoch_file}": grown, f"tb/steps/{steps_file}":
                             (local / "tb" / "steps" / steps_file).stat().st_size} and grown > 0
    assert (mirror / "tb" / epoch_file).stat().st_ino == inode  # appended in place, for a reader holding it open
    assert _event_files(mirror) == _event_files(local)
    accumulator = EventAccumulator(str(mirror / "tb"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("test/acc")] == [(1, 10.0), (2, 20.0), (3, 30.0)]

    storage.remove(f"{run}/tb/steps/{steps_file}")
    assert sync_events(run, mirror) == Changes({}, [f"tb/steps/{steps_file}"])
    assert list(_event_files(mirror)) == [f"tb/{epoch_file}"]


def test_tensorboard_on_a_uri_checks_it_like_a_local_dir_and_reports_a_failed_start(s3_env, tmp_path, capsys,
                                                                                      monkeypatch):
    storage.write_text(f"s3://{BUCKET}/no-events/r/config.yaml", "model: resnet20\n")
    line, _ = _error(capsys, "tensorboard", f"s3://{BUCKET}/no-events")
    assert line == (f"ray-resnet: error: no TensorBoard event files under s3://{BUCKET}/no-events: runs write them "
                    "to <run dir>/tb once their first epoch ends; pass a run dir or a sweep dir")
    line, _ = _error(capsys, "tensorboard", f"s3://{BUCKET}/nothing-here")
    assert line == (f"ray-resnet: error: s3://{BUCKET}/nothing-here does not exist; pass a run dir (runs/<name>) "
                    "or a sweep dir")

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        writer.add_scalar("test/acc", 10.0, 1)
    storage.upload_dir(tmp_path / "tb", f"s3://{BUCKET}/port-taken/tb")
    monkeypatch.setenv("RAY_RESNET_CACHE", str(tmp_path / "cache"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        line, _ = _error(capsys, "tensorboard", f"s3://{BUCKET}/port-taken", "--port", str(taken.getsockname()[1]))
    assert line.startswith(f"ray-resnet: error: TensorBoard on the mirror of s3://{BUCKET}/port-taken exited with "
                           "status ") and line.endswith("its own message above says why (e.g. pass another --port)")


def test_ray_resnet_tensorboard_serves_a_bucket_through_its_mirror_and_stops_with_it(s3_env, tmp_path, monkeypatch,
                                                                                     capsys):
    import psutil
    from test_run_outputs import Served, _free_port
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setenv("RAY_RESNET_CACHE", str(tmp_path / "cache"))  # the mirror's home, for the subprocess too
    local, run = tmp_path / "r1", f"s3://{BUCKET}/served/r1"
    epochs = SummaryWriter(str(local / "tb"))
    for epoch in (1, 2):
        epochs.add_scalar("test/acc", 10.0 * epoch, epoch)
        epochs.add_scalar("train/loss", 2.0 / epoch, epoch)
    epochs.flush()
    storage.upload_dir(local, run)
    port = _free_port()
    served = Served([sys.executable, "-m", "ray_resnet", "tensorboard", run, "--port", str(port), "--refresh-s", "1"],
                    tmp_path / "tb.log", port)
    try:
        tags = served.request("/data/plugin/scalars/tags", ready=lambda t: "tb" in t)
        assert set(tags) == {"tb"} and set(tags["tb"]) == {"test/acc", "train/loss"}
        epochs.add_scalar("test/acc", 30.0, 3)  # the run goes on: its next epoch reaches the bucket
        epochs.close()
        storage.upload_dir(local, run)
        points = served.request("/data/plugin/scalars/scalars?run=tb&tag=test/acc", ready=lambda p: len(p) == 3)
        assert [(step, value) for _, step, value in points] == [(1, 10.0), (2, 20.0), (3, 30.0)]
        children = psutil.Process(served.process.pid).children(recursive=True)  # TensorBoard and its data server
        assert any("tensorboard.main" in " ".join(c.cmdline()) for c in children)
    finally:
        served.stop()
    assert served.process.returncode == 0  # stopped by SIGTERM, as asked: not a failure
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive
    log = served.log.read_text()
    assert f"TensorBoard on {run} at http://127.0.0.1:{port}/ (Ctrl-C stops it)" in log
    assert "mirror refreshed: 1 new or grown event file(s)" in log
    with capsys.disabled():  # shown with -s
        print(f"\n[s3] ray-resnet tensorboard {run} printed:\n  " + "\n  ".join(log.strip().splitlines()))


# --- --download into a bucket ------------------------------------------------------------------------------------

@pytest.fixture
def cifar10_site(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 downloader pointed at a web server on 127.0.0.1 (no internet here) that serves a
    small archive in the real layout: only its URL and md5s are patched; the download, the md5 checks and the
    extraction are torchvision's own. Yields (train set, test set, the requests the server answered)."""
    import hashlib
    import http.server
    import tarfile
    import threading

    from torchvision.datasets import CIFAR10

    train_set, test_set = random_cifar(10, seed=10), random_cifar(5, seed=11)
    folder = write_torchvision_cifar(tmp_path / "src", *train_set, *test_set)
    for file in folder.iterdir():  # torchvision reads the real (Python 2) files' keys as str, ray-resnet as bytes
        entry = pickle.loads(file.read_bytes())
        file.write_bytes(pickle.dumps({**entry, **{key.decode(): value for key, value in entry.items()}}))
    site = tmp_path / "site"
    site.mkdir()
    with tarfile.open(site / CIFAR10.filename, "w:gz") as archive:
        archive.add(folder, arcname=CIFAR10.base_folder)
    requests = []

    class Site(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, format, *args):
            requests.append(f"{self.command} {self.path}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in [*folder.iterdir(), site / CIFAR10.filename]}
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.server_port}/{CIFAR10.filename}")
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5[CIFAR10.filename])
    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5[name]] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, md5[name]] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5[CIFAR10.meta["filename"]]})
    yield train_set, test_set, requests
    server.shutdown()
    server.server_close()


def test_download_into_a_bucket_uploads_torchvisions_files_then_reads_them_from_there(s3_env, cifar10_site, tmp_path,
                                                                                      capsys):
    train_set, test_set, requests = cifar10_site
    root, cache = f"s3://{BUCKET}/downloaded/cifar10", tmp_path / "cache"
    images, labels = load_cifar(root, "train", download=True, cache_dir=cache)
    assert torch.equal(images, train_set[0]) and torch.equal(labels, train_set[1])
    downloaded = list(requests)  # torchvision's GETs of the archive (the first only looks for a redirect)
    assert downloaded and set(downloaded) == {"GET /cifar-10-python.tar.gz"}
    # (pyarrow leaves an empty directory marker, downloaded/cifar10/, where the write check deleted its probe)
    uploaded = [k for k in s3_env.keys("downloaded/") if not k.endswith("/")]
    assert uploaded == [f"downloaded/cifar10/cifar-10-batches-py/{name}" for name in
                        ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")]  # no archive
    assert not list(cache.glob("download-*"))  # the local temp dir (archive and extracted files) is gone
    out = capsys.readouterr().out
    assert f"uploading cifar-10-batches-py to {root}" in out
    with capsys.disabled():  # shown with -s
        print("\n[s3] load_cifar(s3://..., download=True) printed:\n  " + "\n  ".join(out.strip().splitlines()))

    # The other split, and a fresh cache: read from the bucket, nothing downloaded again.
    assert torch.equal(load_cifar(root, "test", download=True, cache_dir=cache)[0], test_set[0])
    assert torch.equal(load_cifar(root, "train", download=False, cache_dir=tmp_path / "fresh")[0], train_set[0])
    assert requests == downloaded


# --- runs, sweeps and commands on S3: real Ray in subprocesses -------------------------------------------------

@pytest.mark.ray
def test_a_two_worker_run_lives_in_the_bucket_and_every_command_reads_it(s3_env, real_cifar_small, tmp_path, capsys):
    run = f"s3://{BUCKET}/runs/r2"
    ray_resnet(s3_env, tmp_path, "train", "--data", str(real_cifar_small), "--storage", f"s3://{BUCKET}/runs",
               "--name", "r2", "--num-workers", "2", *_sets("schedule.epochs=2"))
    keys = s3_env.keys("runs/r2/")
    assert {"runs/r2/config.yaml", "runs/r2/environment.json", "runs/r2/result.json",
            "runs/r2/best/checkpoint.pt"} <= set(keys)
    assert [k for k in keys if k.startswith("runs/r2/checkpoint_") and k.endswith("/checkpoint.pt")]
    assert [k for k in keys if k.startswith("runs/r2/tb/events.out.tfevents.")]
    assert [k for k in keys if k.startswith("runs/r2/tb/steps/events.out.tfevents.")]
    assert not list(tmp_path.iterdir())  # nothing local: no runs/ dir
    result = storage.read_json(f"{run}/result.json")
    assert result["status"] == "finished" and result["checkpoint"].startswith(f"{run}/checkpoint_")
    assert sorted(read_curve(f"{run}/tb")) == [1, 2]
    with capsys.disabled():  # shown with -s
        print("\n[s3] bucket listing of a 2-worker run:\n  " + "\n  ".join(keys))

    # The rerun of a finished run says so, reading everything from the bucket; another recipe is refused.
    assert "is already finished" in ray_resnet(s3_env, tmp_path, "train", "--data", str(real_cifar_small),
                                               "--storage", f"s3://{BUCKET}/runs", "--name", "r2",
                                               *_sets("schedule.epochs=2")).stdout
    line, _ = _error(capsys, "train", "--data", str(real_cifar_small), "--storage", f"s3://{BUCKET}/runs", "--name",
                     "r2", *_sets("schedule.epochs=2", "optim.lr=0.2"))
    assert f"run dir {run} holds a run with another config (optim.lr: 0.05 -> 0.2)" in line

    assert cli.main(["eval", "--checkpoint", run, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["kind"] == "best" and evaluated["count"] == 500 and evaluated["file"] == f"{run}/best/checkpoint.pt"
    assert cli.main(["eval", "--checkpoint", run, "--final"]) == 0
    assert "from the final checkpoint of epoch 2" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", run, "--format", "state_dict", "--output", f"{run}/r20.pt"]) == 0
    assert "same top-1 on 256/256" in capsys.readouterr().out and storage.is_file(f"{run}/r20.pt")
    assert cli.main(["eval", "--weights", f"{run}/r20.pt", "--model", "resnet20", "--data",
                     str(real_cifar_small), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"] == evaluated["acc"]

    from test_run_outputs import SCALAR_TAGS, Served, _free_port

    port = _free_port()
    served = Served([sys.executable, "-m", "ray_resnet", "tensorboard", run, "--port", str(port)],
                    tmp_path / "tb.log", port)
    try:
        tags = served.request("/data/plugin/scalars/tags", ready=lambda t: SCALAR_TAGS <= set(t.get("tb", {})))
        points = served.request("/data/plugin/scalars/scalars?run=tb&tag=test/acc")
        assert set(tags) == {"tb", "tb/steps"} and [step for _, step, _ in points] == [1, 2]
        steps = served.request("/data/plugin/scalars/scalars?run=tb%2Fsteps&tag=step/lr")
        assert [step for _, step, _ in steps] == [2, 4, 6, 8]  # run.log_every_steps=2 of 4 steps per epoch
    finally:
        served.stop()


@pytest.mark.ray
def test_two_nodes_with_storage_and_data_only_in_s3(two_node_runs):
    out = two_node_runs["s3"]
    summary = out["summary"]
    assert isinstance(summary, dict), summary
    assert summary["epoch"] == 2 and summary["run_dir"] == f"s3://{BUCKET}/cluster/s3"
    assert sorted(out["worker_nodes"]) == out["cluster_nodes"]  # SPREAD: one rank on each node
    # Up to borderline top-1 flips: the 2 ranks' float32 kernels (channels_last, 100 images each) round otherwise
    # than one process's (contiguous, 200 images); 1 image is 0.5 points.
    assert summary["final_test_acc"] == pytest.approx(out["single_process_test_acc"], abs=1.01)  # <= 2 of 200


@pytest.mark.ray
def test_a_sweep_in_s3_resumes_and_reports(s3_env, s3_data, tmp_path, capsys):
    import yaml

    file = tmp_path / "s3sweep.yaml"
    file.write_text(yaml.safe_dump({
        "name": "s3sweep", "grid": {"seed": [0, 1]},
        "config": {"data": {"root": s3_data, "train_subset": 128, "test_subset": 64}, "optim": {"batch_size": 64},
                   "schedule": {"epochs": 1, "warmup_epochs": 0, "milestones": []}, "perf": {"eval_batch_size": 64}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}}))
    args = ["sweep", "-c", str(file), "--storage", f"s3://{BUCKET}/sweeps"]
    assert "sweep s3sweep: 2/2 trials finished" in ray_resnet(s3_env, tmp_path, *args).stdout
    sweep = f"s3://{BUCKET}/sweeps/s3sweep"
    before = {k: v for k, v in _etags(s3_env, "sweeps/s3sweep/").items() if "result.json" in k}
    assert len(before) == 2 and "sweeps/s3sweep/sweep.yaml" in s3_env.keys("sweeps/s3sweep/")
    assert "2/2 trials finished" in ray_resnet(s3_env, tmp_path, *args, "--resume").stdout
    assert {k: v for k, v in _etags(s3_env, "sweeps/s3sweep/").items() if "result.json" in k} == before
    assert cli.main(["report", sweep]) == 0
    assert "| resnet20 | 269,722 | 2 |" in capsys.readouterr().out
    assert {"sweeps/s3sweep/report.md", "sweeps/s3sweep/report.csv", "sweeps/s3sweep/curves.png"} <= set(
        s3_env.keys("sweeps/s3sweep/"))
    assert not list(tmp_path.glob("runs"))


def _etags(s3, prefix: str) -> dict[str, str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["ETag"] + str(o["LastModified"]) for page in pages for o in page.get("Contents", [])}
