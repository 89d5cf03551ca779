"""`ray-resnet status`: the table of the runs and sweeps under a storage root, read from run dirs written by the
project's own writers (config.yaml, environment.json, result.json, checkpoints) and, for a bucket, from the same
tree in a real S3 endpoint on 127.0.0.1 (moto's server)."""

import json
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from ray_resnet.apps import cli
from ray_resnet.apps.status import RUNNING_WITHIN_S, read_status
from ray_resnet.config import load_config, replace, to_dict
from ray_resnet.constants import SWEEP_FILE
from ray_resnet.core.checkpoint import CheckpointState, save_checkpoint
from ray_resnet.io import environment, storage
from ray_resnet.io.rundir import (
    SNAPSHOT_FILE,
    RunResult,
    read_result,
    record_attempt,
    record_duration,
    run_dir,
    write_config,
    write_result,
)

from fixtures import FINISHED_RUN_EPOCHS, own_lines
from s3_server import BUCKET, S3Server

TWO_HOURS_S = 2 * 3600


def _run(storage_root: Path, name: str, model: str, epochs: int, recipe: str = "timm"):
    """A run dir as the driver starts it (config.yaml), and its config."""
    cfg = load_config(None, [f"model={model}", f"recipe={recipe}", f"schedule.epochs={epochs}",
                             f"run.storage={storage_root}", f"run.name={name}", "schedule.warmup_epochs=0",
                             "schedule.milestones=[]"])
    write_config(cfg)
    return Path(run_dir(cfg)), cfg


def _attempt(directory: Path, host: str, started: str, duration_s: float) -> None:
    """An attempt in environment.json as the driver records it (with a fixed host and start, for exact rows), and
    its duration as rank 0 updates it after each epoch."""
    record = environment.attempt(["ray-resnet", "train"], 1)
    record["driver"]["host"], record["started"] = host, started
    record_duration(str(directory), record_attempt(str(directory), record), duration_s)


def _epochs(directory: Path, cfg, test_accs: list[float]) -> None:
    """Epochs 1..n as rank 0 logs them (tb/) and Ray Train commits their checkpoints: the latest
    run.keep_checkpoints checkpoint_* dirs and its snapshot file, in Ray 2.60's format (the metrics are those
    ray.train.report gets)."""
    with SummaryWriter(str(directory / "tb")) as writer:
        for epoch, acc in enumerate(test_accs, start=1):
            writer.add_scalar("test/acc", acc, epoch)
    committed = []
    for epoch, acc in enumerate(test_accs, start=1):
        metrics = {"epoch": epoch, "test_acc": acc, "best_test_acc": max(test_accs[:epoch]),
                   "best_epoch": test_accs.index(max(test_accs[:epoch])) + 1, "params": 269722}
        committed.append({"version": 0, "checkpoint_dir_name": f"checkpoint_2026-01-05_10-{epoch:02d}-00.000000",
                          "metrics": metrics})
    kept = committed[-cfg.run.keep_checkpoints:]
    for entry in kept:
        save_checkpoint(CheckpointState({}, to_dict(cfg), entry["metrics"]["epoch"], entry["metrics"]),
                        directory / entry["checkpoint_dir_name"])
    (directory / SNAPSHOT_FILE).write_text(json.dumps(
        {"ray_version": "2.60.0", "checkpoint_results": kept, "checkpoint_report_indices": list(range(len(kept))),
         "latest_checkpoint_result": kept[-1], "pending_training_results": [], "current_report_index": len(kept)}))


def _result(directory: Path, cfg, status: str, epoch: int, accs: tuple, wall_time_s: float, **more) -> None:
    """result.json as the driver writes it when the workers return (`accs`: final and best test accuracy)."""
    write_result(str(directory), RunResult(
        epoch=epoch, epochs=cfg.schedule.epochs, name=cfg.run.name, model=cfg.model, dataset=cfg.data.dataset,
        status=status, final_test_acc=accs[0], best_test_acc=accs[1], wall_time_s=wall_time_s, **more))


def _age(directory: Path, seconds: float) -> float:
    """Every file below `directory` last written `seconds` ago; returns that time."""
    when = time.time() - seconds
    for path in directory.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))
    return when


def _tree(root: Path) -> Path:
    """A storage root with a finished run (2 attempts), a diverged one, one killed 2 h ago, one training now, and
    a sweep (runs/sweeps/<name>, as `ray-resnet sweep` writes it) with a finished and an interrupted trial."""
    done, cfg = _run(root, "r20-done", "resnet20", 3)
    _attempt(done, "node-a", "2026-01-05T09:30:00+00:00", 1800.0)
    _attempt(done, "node-b", "2026-01-05T11:00:00+00:00", 1923.4)
    _epochs(done, cfg, [60.0, 83.1, 82.5])
    _result(done, cfg, "finished", 3, (82.5, 83.1), 3723.4, attempts=2)

    nan, cfg = _run(root, "r32-nan", "resnet32", 3, recipe="paper")
    _attempt(nan, "node-a", "2026-01-05T12:00:00+00:00", 95.0)
    _epochs(nan, cfg, [41.0])
    _result(nan, cfg, "diverged", 1, (41.0, 41.0), 95.0, diverged_loss=math.nan, diverged_epoch=2)

    killed, cfg = _run(root, "r44-killed", "resnet44", 5)
    _attempt(killed, "node-c", "2026-01-06T08:00:00+00:00", 1250.0)
    _epochs(killed, cfg, [50.0, 66.5])
    _age(killed, TWO_HOURS_S)

    now, cfg = _run(root, "r56-now", "resnet56", 4)
    _attempt(now, "node-a", "2026-01-06T09:00:00+00:00", 310.0)
    _epochs(now, cfg, [55.25])

    sweep = root / "sweeps" / "depth"
    sweep.mkdir(parents=True)
    (sweep / SWEEP_FILE).write_text(yaml.safe_dump({"name": "depth", "grid": {"model": ["resnet20", "plain20"]}}))
    trial, cfg = _run(sweep, "resnet20-s0", "resnet20", 2)
    _attempt(trial, "node-d", "2026-01-06T10:00:00+00:00", 600.0)
    _epochs(trial, cfg, [70.0, 80.0])
    _result(trial, cfg, "finished", 2, (80.0, 80.0), 600.0)
    trial, cfg = _run(sweep, "plain20-s0", "plain20", 2)  # stopped before its first checkpoint
    _attempt(trial, "node-d", "2026-01-06T10:10:00+00:00", 0.0)
    _age(trial, TWO_HOURS_S)
    return root


TABLE = """\
name                      model     recipe  status       epoch  test acc   best  wall time  started (UTC)     host
r20-done                  resnet20  timm    finished       3/3     82.50  83.10    1:02:03  2026-01-05 09:30  node-b
r32-nan                   resnet32  paper   diverged       1/3     41.00  41.00       1:35  2026-01-05 12:00  node-a
r44-killed                resnet44  timm    interrupted    2/5     66.50  66.50      20:50  2026-01-06 08:00  node-c
r56-now                   resnet56  timm    running        1/4     55.25  55.25       5:10  2026-01-06 09:00  node-a
sweeps/depth/plain20-s0   plain20   timm    interrupted    0/2         —      —       0:00  2026-01-06 10:10  node-d
sweeps/depth/resnet20-s0  resnet20  timm    finished       2/2     80.00  80.00      10:00  2026-01-06 10:00  node-d

6 runs: 2 finished, 1 diverged, 1 running, 2 interrupted; sweep sweeps/depth: 2 trials (1 finished, 1 interrupted)
"""


def test_the_table_shows_each_run_and_sweep_trial(tmp_path, capsys):
    root = _tree(tmp_path / "runs")
    assert cli.main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(TABLE), out
    assert "running: no result.json yet and a file written in the last 10 minutes" in out


def test_json_lists_one_object_per_run(tmp_path, capsys):
    root = _tree(tmp_path / "runs")
    killed_at = _age(root / "r44-killed", TWO_HOURS_S)
    assert cli.main(["status", str(root), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["r20-done", "r32-nan", "r44-killed", "r56-now", "sweeps/depth/plain20-s0",
                          "sweeps/depth/resnet20-s0"]
    assert rows["r20-done"] == {
        "name": "r20-done", "sweep": None, "run_dir": str(root / "r20-done"), "model": "resnet20", "recipe": "timm",
        "status": "finished", "epoch": 3, "epochs": 3, "test_acc": 82.5, "best_test_acc": 83.1,
        "wall_time_s": 3723.4, "started": "2026-01-05T09:30:00+00:00", "host": "node-b",
        "last_write": rows["r20-done"]["last_write"], "holder": None}
    assert rows["r44-killed"]["last_write"] == time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(int(killed_at)))
    assert rows["sweeps/depth/plain20-s0"]["sweep"] == "sweeps/depth"
    assert [rows[n]["status"] for n in rows] == ["finished", "diverged", "interrupted", "running", "interrupted",
                                                 "finished"]


def test_a_sweep_dir_or_a_run_dir_alone(tmp_path):
    root = _tree(tmp_path / "runs")
    assert [(r.name, r.sweep) for r in read_status(str(root / "sweeps" / "depth"))] == [
        ("plain20-s0", "depth"), ("resnet20-s0", "depth")]
    assert [(r.name, r.status, r.epoch) for r in read_status(str(root / "r56-now"))] == [("r56-now", "running", 1)]


def test_a_finished_run_given_more_epochs_trains_on(tmp_path):
    root = _tree(tmp_path / "runs")
    cfg = load_config(None, ["model=resnet20", "schedule.epochs=3", "schedule.warmup_epochs=0",
                             "schedule.milestones=[]", f"run.storage={root}", "run.name=r20-done"])
    write_config(replace(cfg, schedule={"epochs": 5}))  # the rerun's config.yaml; result.json stays until its end
    row = next(r for r in read_status(str(root)) if r.name == "r20-done")
    assert (row.status, row.epoch, row.epochs, row.test_acc) == ("running", 3, 5, 82.5)
    later = next(r for r in read_status(str(root), time.time() + RUNNING_WITHIN_S + 1) if r.name == "r20-done")
    assert later.status == "interrupted"


def test_a_real_run_and_its_copy_without_result_json(finished_run, tmp_path):
    """Ray Train's own snapshot file: the interrupted copy shows the epoch and accuracies of its checkpoint."""
    result = read_result(str(finished_run))
    shutil.copytree(finished_run, tmp_path / "runs" / "real")
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "result.json").unlink()
    _age(copy, TWO_HOURS_S)
    rows = {row.name: row for row in read_status(str(tmp_path / "runs"))}
    real, interrupted = rows["real"], rows["copy"]
    epochs = FINISHED_RUN_EPOCHS
    assert (real.status, real.epoch, real.epochs, real.test_acc, real.best_test_acc, real.host) == (
        "finished", epochs, epochs, result.final_test_acc, result.best_test_acc, socket.gethostname())
    assert (interrupted.status, interrupted.epoch, interrupted.epochs, interrupted.test_acc,
            interrupted.best_test_acc) == ("interrupted", epochs, epochs, result.final_test_acc, result.best_test_acc)
    assert interrupted.wall_time_s == pytest.approx(result.wall_time_s, abs=0.2)


def test_an_unreadable_config_leaves_the_rest_of_the_row(tmp_path):
    root = _tree(tmp_path / "runs")
    (root / "r32-nan" / "config.yaml").write_text("model: [unclosed")
    row = next(r for r in read_status(str(root)) if r.name == "r32-nan")
    assert (row.model, row.recipe, row.status, row.epoch, row.epochs) == (None, None, "diverged", 1, 3)


def test_a_missing_or_empty_root_or_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path / "nowhere")]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"ray-resnet: error: {tmp_path / 'nowhere'} does not exist: "), err
    (tmp_path / "empty" / "tb").mkdir(parents=True)
    (tmp_path / "empty" / "tb" / "notes.txt").write_text("not a run")
    assert cli.main(["status", str(tmp_path / "empty")]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "empty holds no run dirs: expected dirs holding config.yaml" in err[0], err
    assert cli.main(["status", str(tmp_path / "empty" / "tb" / "notes.txt")]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "notes.txt is a file: expected dirs holding config.yaml" in err[0], err


def test_a_bucket_shows_the_same_runs_from_one_listing(tmp_path, monkeypatch, capsys):
    server = S3Server(tmp_path / "moto.log")  # its own server: the test counts the requests in its log
    try:
        server.client().create_bucket(Bucket=BUCKET)
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        root = _tree(tmp_path / "runs")
        uri = f"s3://{BUCKET}/team/runs"
        storage.upload_dir(root, uri)
        requests_before = _requests(tmp_path / "moto.log")
        # A bucket's files are as new as their upload: both trees are judged as of a time when neither is running.
        later = time.time() + RUNNING_WITHIN_S + 60
        bucket, local = read_status(uri, later), read_status(str(root), later)
        requests = _requests(tmp_path / "moto.log")[len(requests_before):]
        assert cli.main(["status", uri]) == 0
    finally:
        server.stop()
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == TABLE.splitlines()[0].split()
    assert [line.split()[:2] for line in table[1:7]] == [line.split()[:2] for line in TABLE.splitlines()[1:7]]
    assert [_portable(r) for r in bucket] == [_portable(r) for r in local]
    assert bucket[0].run_dir == f"{uri}/r20-done" and bucket[0].status == "finished"
    assert [r.status for r in bucket] == ["finished", "diverged", "interrupted", "interrupted", "interrupted",
                                          "finished"]
    # One listing, then one read of each row file (pyarrow's S3 reader asks its size first: a HEAD, then the GET);
    # nothing of the checkpoints or tb/, and no existence check of its own.
    row_files = sorted(f"/{BUCKET}/team/runs/{p.relative_to(root)}" for p in root.rglob("*")
                       if p.name in ("config.yaml", "result.json", "environment.json", SNAPSHOT_FILE))
    assert [path for method, path in requests if method == "GET" and "list-type=2" in path] == [
        f"/{BUCKET}?list-type=2&max-keys=1000&prefix=team/runs/"]
    assert sorted(path for method, path in requests if method == "GET" and "list-type" not in path) == row_files
    assert sorted(path for method, path in requests if method == "HEAD") == row_files
    assert len(requests) == 1 + 2 * len(row_files) == 41  # 20 row files in 6 run dirs


def _portable(row) -> tuple:
    """A row without what depends on where the tree is: its location and when its files were written."""
    return (row.name, row.sweep, row.model, row.recipe, row.status, row.epoch, row.epochs, row.test_acc,
            row.best_test_acc, row.wall_time_s, row.started, row.host)


def _requests(log: Path) -> list[tuple[str, str]]:
    """(method, path) of every HTTP request moto's server has logged (werkzeug colours some lines)."""
    return re.findall(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP', log.read_text())
