"""One writer per run dir (io/lease.py), on a local dir and on a real S3 endpoint (moto's server): contenders in real
processes, started together; a killed holder; a claim written as another machine would; a stopped holder.

The lease's timing is a parameter (lease.Timing), shrunk here so each test takes seconds."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ray_resnet.apps import cli
from ray_resnet.apps.status import read_status
from ray_resnet.config import load_config, read_config, save_config
from ray_resnet.constants import CONFIG_FILE
from ray_resnet.errors import DirInUseError
from ray_resnet.io import lease, storage
from ray_resnet.io.rundir import run_dir, write_config

from fixtures import own_lines
from s3_server import BUCKET

REPO = Path(__file__).resolve().parents[1]
HOLDER = Path(__file__).resolve().with_name("lease_holder.py")
FIX = "wait for it to end, or pick another --name"
REFUSAL = re.compile(r"^ray-resnet: error: run dir (\S+) is in use by pid (\d+) on host (\S+) since "
                     r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(heartbeat \d+ s ago\): " + re.escape(FIX))
FAST = lease.Timing(beat_s=0.3, stale_s=3.0)  # settle_s stays 2 s: it must exceed S3's 1 s time resolution


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, monkeypatch):
    """(a run dir that does not exist yet, the environment a process needs to reach it); this process gets it too."""
    if request.param == "local":
        return str(tmp_path / "runs" / "x"), {}
    s3 = request.getfixturevalue("s3")
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return f"s3://{BUCKET}/lease-{uuid.uuid4().hex[:8]}/x", s3.env


def start_holder(directory: str, env: dict, start_at: float, hold_s: float,
                 timing: lease.Timing = FAST) -> subprocess.Popen:
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, str(HOLDER), directory, str(start_at), str(hold_s), str(timing.beat_s),
                             str(timing.stale_s), str(timing.settle_s)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_holding(holder: subprocess.Popen) -> None:
    assert holder.stdout.readline().strip() == "holding", holder.stderr.read()


def lease_files(directory: str) -> dict[str, float]:
    """`.lease/` of a dir: file name -> its modification time by the store's clock."""
    return {f.path: f.mtime_s for f in storage.walk(storage.join(directory, lease.LEASE_DIR))}


def write_claim(directory: str, claim_id: str, record: dict) -> None:
    """A claim and a beat as a driver elsewhere writes them."""
    storage.write_text(storage.join(directory, lease.LEASE_DIR, claim_id + lease.CLAIM), json.dumps(record))
    storage.write_text(storage.join(directory, lease.LEASE_DIR, claim_id + lease.BEAT), "")


@pytest.mark.parametrize("round_", [1, 2])
def test_of_contenders_started_together_one_holds_and_the_others_are_refused_in_one_line(where, round_):
    directory, env = where
    # The default settle time, which covers an object store's 1 s time resolution: the claims share a second.
    timing = lease.Timing(beat_s=0.3, stale_s=10.0, settle_s=lease.Timing().settle_s)
    start_at = time.time() + 2.0  # after every process has imported what it needs
    procs = [start_holder(directory, env, start_at, hold_s=4.0, timing=timing) for _ in range(3)]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    holders = [p for p, (out, _) in zip(procs, outs) if out.strip() == "holding"]
    assert len(holders) == 1 and holders[0].returncode == 0, outs
    for p, (out, err) in zip(procs, outs):
        if p is holders[0]:
            continue
        assert p.returncode == 2 and not out.strip(), err
        (line,) = own_lines(err)
        refusal = REFUSAL.match(line)
        assert refusal, line
        assert refusal.group(1) == directory and int(refusal.group(2)) == holders[0].pid
    assert lease_files(directory) == {}  # the holder released it, the refused left nothing
    if not storage.is_uri(directory):
        assert not Path(directory).parent.exists()  # nor the dirs the lease alone had made (runs/x)


def test_the_holders_claim_is_all_a_refused_driver_sees_and_it_changes_nothing(where):
    directory, env = where
    holder = start_holder(directory, env, time.time(), hold_s=30.0)
    try:
        wait_holding(holder)
        before = lease_files(directory)
        assert sorted(Path(name).suffix for name in before) == [lease.BEAT, lease.CLAIM]
        with pytest.raises(DirInUseError, match=rf"is in use by pid {holder.pid} on host .*\(heartbeat \d s ago\)"):
            with lease.held(directory, "run dir", FIX, FAST):
                pytest.fail("two holders")
        after = lease_files(directory)
        assert after.keys() == before.keys()  # its own claim is gone again
        current = lease.live_holder(directory, FAST)
        assert current is not None and current.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(where):
    directory, env = where
    holder = start_holder(directory, env, time.time(), hold_s=300.0, timing=lease.Timing())  # stale after 60 s
    wait_holding(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (dead_claim,) = [name for name in lease_files(directory) if name.endswith(lease.CLAIM)]
    start = time.perf_counter()
    with lease.held(directory, "run dir", FIX, lease.Timing(settle_s=0.5)) as mine:
        took_s = time.perf_counter() - start
        assert sorted(lease_files(directory)) == [mine.id + lease.BEAT, mine.id + lease.CLAIM]
    assert dead_claim != mine.id + lease.CLAIM
    assert took_s < 10, f"{took_s:.1f} s"  # not the 60 s a silent holder elsewhere gets


def test_a_claim_from_another_machine_lapses_only_after_its_beats_stop_for_the_bound(where):
    directory, _ = where
    # This process's own pid, alive here, means nothing on the other machine: only its beats tell.
    other = {"host": "elsewhere", "pid": os.getpid(), "machine": "elsewhere/pid:[4026531836]",
             "process_start": "1", "started": "2026-12-06 15:20:01 UTC"}
    write_claim(directory, "0" * 32, other)
    written_s = time.monotonic()
    before = lease_files(directory)
    with pytest.raises(DirInUseError, match=rf"in use by pid {os.getpid()} on host elsewhere since .* UTC "
                                            r"\(heartbeat \d s ago\): .*lapses 3 s after its last beat"):
        with lease.held(directory, "run dir", FIX, FAST):
            pytest.fail("a live claim taken over")
    assert lease_files(directory) == before  # nothing changed
    # Past the bound (and the store's 1 s time resolution) with no beat: it is taken over, its files deleted.
    time.sleep(max(0.0, written_s + FAST.stale_s + 1.5 - time.monotonic()))
    with lease.held(directory, "run dir", FIX, FAST) as mine:
        assert sorted(lease_files(directory)) == [mine.id + lease.BEAT, mine.id + lease.CLAIM]


def test_the_heartbeat_keeps_a_live_lease_and_a_stopped_holder_lapses(where):
    directory, env = where
    holder = start_holder(directory, env, time.time(), hold_s=300.0)
    try:
        wait_holding(holder)
        time.sleep(2 * FAST.stale_s)  # twice the bound: only its beats keep it
        with pytest.raises(DirInUseError, match=rf"pid {holder.pid} .*\(heartbeat [01] s ago\)"):
            with lease.held(directory, "run dir", FIX, FAST):
                pytest.fail("a beating holder taken over")
        holder.send_signal(signal.SIGSTOP)  # alive (its pid says so) but silent, as in a hung driver
        time.sleep(FAST.stale_s + 1.5)
        with lease.held(directory, "run dir", FIX, FAST) as mine:
            assert lease.live_holder(directory, FAST).id == mine.id
            holder.send_signal(signal.SIGCONT)  # its next beat finds its claim gone, and says so
            time.sleep(5 * FAST.beat_s)
            assert lease.live_holder(directory, FAST).id == mine.id  # its beats do not bring its claim back
        holder.send_signal(signal.SIGTERM)
        assert "was taken over by another driver" in holder.communicate(timeout=30)[1]
    finally:
        holder.kill()
        holder.wait()


# --- the commands: `train` and `sweep` refuse a held dir before reading it; `status` names the holder -----------

def _digest(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_and_sweep_on_a_held_dir_are_one_line_exit_2_and_change_nothing(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    # Another recipe's config.yaml: a driver that read it before taking the lease would fail on that instead.
    save_config(load_config(None, ["model=resnet56", f"run.storage={run.parent}", "run.name=x"]), run / CONFIG_FILE)
    sweep_file = tmp_path / "sweep_depth.yaml"
    sweep_file.write_text(yaml.safe_dump({"grid": {"seed": [0, 1]}, "config": {
        "schedule": {"epochs": 1, "warmup_epochs": 0, "milestones": []}}}))
    for directory, argv, what in (
            (run, ["train", "--storage", str(run.parent), "--name", "x", "--data", str(tmp_path / "none")], "run dir"),
            (tmp_path / "sweeps" / "depth", ["sweep", "-c", str(sweep_file), "--storage", str(tmp_path / "sweeps"),
                                              "--data", str(tmp_path / "none")], "sweep dir")):
        with lease.held(str(directory), what, FIX):  # default timing: no beat during the command
            before = _digest(directory)
            assert cli.main(argv) == 2
            (line,) = own_lines(capsys.readouterr().err)
            assert line.startswith(f"ray-resnet: error: {what} {directory} is in use by pid {os.getpid()} on host "
                                   f"{socket.gethostname()} since "), line
            assert _digest(directory) == before


def test_status_names_the_driver_holding_a_run(tmp_path, capsys):
    root = tmp_path / "runs"
    cfg = load_config(None, [f"run.storage={root}", "run.name=held", "schedule.epochs=3", "schedule.warmup_epochs=0",
                             "schedule.milestones=[]"])
    write_config(cfg)
    with lease.held(run_dir(cfg), "run dir", FIX):
        assert cli.main(["status", str(root)]) == 0
        (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("held ")]
        assert re.search(rf"  running +0/3 .*  {re.escape(socket.gethostname())} \(pid {os.getpid()}, "
                         r"beat [0-2] s ago\)$", row), row
        (held,) = read_status(str(root))
        assert held.holder["pid"] == os.getpid() and held.holder["heartbeat_age_s"] < 3
    (released,) = read_status(str(root))
    assert released.holder is None and released.status == "running"  # by its recent writes alone


@pytest.mark.ray
def test_two_train_commands_started_together_on_one_name(real_cifar_small, tmp_path):
    """The shell loop `for lr in ...; do ray-resnet train --set optim.lr=$lr & done`: one trains, the other stops."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    sets = ["data.train_subset=128", "data.test_subset=64", "optim.batch_size=64", "schedule.epochs=1",
            "schedule.warmup_epochs=0", "schedule.milestones=[]", "perf.eval_batch_size=64"]
    procs = [subprocess.Popen([sys.executable, "-m", "ray_resnet", "train", "--data", str(real_cifar_small),
                               "--storage", str(tmp_path), "--name", "same", *[a for s in sets for a in ("--set", s)],
                               "--set", f"optim.lr={lr}"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for lr in (0.1, 0.05)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert sorted(p.returncode for p in procs) == [0, 2], outs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert own_lines(outs[loser][0] + outs[loser][1]) == [own_lines(outs[loser][1])[0]]  # its one line, no Ray
    refusal = REFUSAL.match(own_lines(outs[loser][1])[0])
    assert refusal and int(refusal.group(2)) == procs[winner].pid, outs[loser]
    assert "done: same" in outs[winner][0]
    record = json.loads((tmp_path / "same" / "environment.json").read_text())
    assert len(record["attempts"]) == 1  # the refused driver recorded no attempt
    assert read_config(str(tmp_path / "same" / CONFIG_FILE)).optim.lr == (0.1, 0.05)[winner]
    assert not (tmp_path / "same" / lease.LEASE_DIR).exists()
