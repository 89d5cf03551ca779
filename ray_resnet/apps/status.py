"""`ray-resnet status [DIR|URI]`: one table of the runs and sweeps under a storage root (runs/, s3://bucket/runs,
a sweep dir or one run dir): each run's model, recipe, status, epoch, test accuracies, time, start and host.

Pure (no Ray, no torch) and made for buckets with hundreds of runs: one recursive listing of the root finds the
run dirs (dirs holding config.yaml), the sweep dirs (sweep.yaml) and when each run last wrote a file; then only
each run's small files are read, concurrently and without existence checks (the listing has them): config.yaml,
result.json, environment.json, Ray Train's checkpoint_manager_snapshot.json and the claims of a run's lease
(io/lease.py): a live one names the driver writing the run now.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import posixpath
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from ray_resnet.apps.cli import clock
from ray_resnet.config import saved_config
from ray_resnet.constants import CONFIG_FILE, ENVIRONMENT_FILE, RESULT_FILE, SWEEP_FILE
from ray_resnet.errors import ConfigError, NoRunDirsError
from ray_resnet.io import lease, storage
from ray_resnet.io.rundir import (
    SNAPSHOT_FILE,
    RunResult,
    attempts_from,
    committed_epoch,
    result_from,
)
from ray_resnet.io.storage import ListedFile

# A run without result.json is "running" while it has written a file in the last RUNNING_WITHIN_S seconds, else
# "interrupted". A training run writes far more often: rank 0 flushes tb/steps every run.log_every_steps steps (50
# steps: about 15 s on 2 CPU cores at batch 128; a bucket gets them at most 60 s later) and rewrites
# environment.json and tb/ after every epoch.
RUNNING_WITHIN_S = 10 * 60
# The files a row is read from; the run dir's other files (checkpoints, tb/) are only listed, for their mtimes.
ROW_FILES = (CONFIG_FILE, RESULT_FILE, ENVIRONMENT_FILE, SNAPSHOT_FILE)
COLUMNS = ("name", "model", "recipe", "status", "epoch", "test acc", "best", "wall time", "started (UTC)", "host")
RIGHT_ALIGNED = {"epoch", "test acc", "best", "wall time"}
STATUS_ORDER = ("finished", "diverged", "error", "running", "interrupted")  # how the counts line lists them
FOOTNOTE_WIDTH = 116  # characters


@dataclass(frozen=True)
class RunStatus:
    """One run: a row of the table, an object of --json."""

    name: str  # the run dir's path under the root (a sweep's trial: <sweep>/<trial>)
    sweep: str | None  # the sweep dir's path under the root, for a sweep's trial
    run_dir: str  # the run dir's location
    model: str | None  # None: config.yaml unreadable
    recipe: str | None
    status: str  # finished, diverged, or another status result.json holds; without one running or interrupted
    epoch: int  # epochs trained (result.json); else the latest committed checkpoint's: where a resume starts
    epochs: int | None  # schedule.epochs
    test_acc: float | None  # % after `epoch`: a finished run's final test accuracy
    best_test_acc: float | None  # % of best/'s epoch
    wall_time_s: float  # every attempt's time added up (seconds)
    started: str | None  # when its first attempt started (UTC, ISO 8601)
    host: str | None  # where its latest attempt's driver ran
    last_write: str  # when it last wrote a file (UTC, ISO 8601)
    holder: dict | None = None  # the driver holding its lease now: host, pid, since (UTC), heartbeat_age_s


def read_status(root: str, now_s: float | None = None) -> list[RunStatus]:
    """Every run below `root` (or `root` itself when it is a run dir), by name, as of `now_s` (seconds since the
    Unix epoch; default: now)."""
    root = storage.absolute(root)
    try:
        listed = storage.walk(root)
    except NotADirectoryError:  # e.g. a run's config.yaml
        raise _no_runs(root, "is a file") from None
    runs = files_by_run(listed)
    if not runs:
        raise _no_runs(root, "holds no run dirs" if listed or storage.exists(root) else "does not exist")
    present = {f.path for f in listed}
    sweeps = {posixpath.dirname(path) for path in present if posixpath.basename(path) == SWEEP_FILE}
    wanted = [posixpath.join(run, name) for run in runs for name in ROW_FILES if posixpath.join(run, name) in present]
    wanted += [f.path for files in runs.values() for f in files if _is_claim(f.path)]
    contents = dict(zip(wanted, storage.read_files([storage.join(root, path) for path in wanted])))
    now_s = time.time() if now_s is None else now_s
    rows = []
    for run, files in sorted(runs.items()):
        parent = posixpath.dirname(run) if run else None
        read = {name: contents.get(posixpath.join(run, name)) for name in ROW_FILES}
        rows.append(run_status(RunFiles(root, run, parent if parent in sweeps else None, read,
                                        max(f.mtime_s for f in files), _live_holder(run, files, contents, now_s)),
                               now_s))
    return rows


def _is_claim(path: str) -> bool:
    return posixpath.basename(posixpath.dirname(path)) == lease.LEASE_DIR and path.endswith(lease.CLAIM)


def _live_holder(run: str, files: list[ListedFile], contents: dict, now_s: float) -> lease.Holder | None:
    """The driver holding the run's lease at `now_s` (this machine's clock), from the listing and its claims."""
    prefix = posixpath.join(run, lease.LEASE_DIR) + "/"
    listed = [dataclasses.replace(f, path=f.path[len(prefix):]) for f in files if f.path.startswith(prefix)]
    claims = {f.path: contents.get(prefix + f.path) for f in listed if f.path.endswith(lease.CLAIM)}
    live = [h for h in lease.holders_from(listed, claims) if not lease.is_gone(h, now_s, lease.Timing().stale_s)]
    return live[0] if live else None


def files_by_run(listed: list[ListedFile]) -> dict[str, list[ListedFile]]:
    """Run dir (its path under the root; "" for the root itself) -> every file below it."""
    runs: dict[str, list[ListedFile]] = {posixpath.dirname(f.path): [] for f in listed
                                         if posixpath.basename(f.path) == CONFIG_FILE}
    for f in listed:
        owner = _run_dir_of(f.path, runs)
        if owner is not None:
            runs[owner].append(f)
    return runs


def _run_dir_of(path: str, runs: dict) -> str | None:
    """The run dir a file lies in (the nearest of its parent dirs that is one), or None."""
    directory = posixpath.dirname(path)
    while directory not in runs:
        if not directory:
            return None
        directory = posixpath.dirname(directory)
    return directory


def _location(root: str, path: str) -> str:
    return storage.join(root, path) if path else root


def _display(root: str, path: str) -> str:
    """A dir's name in the table: its path under the root, or the root's own name."""
    return path or storage.name(root)


@dataclass(frozen=True)
class RunFiles:
    """What a row is made of: run dir `run` (its path under `root`), the sweep dir it is a trial of (its path under
    `root`; None: not a trial), the bytes of its ROW_FILES (None for one it lacks), when it last wrote a file
    (seconds since the Unix epoch) and the driver holding its lease (None: none alive)."""

    root: str
    run: str
    sweep: str | None
    read: dict[str, bytes | None]
    last_write_s: float
    holder: lease.Holder | None = None


def run_status(files: RunFiles, now_s: float) -> RunStatus:
    """The row of one run dir, at time `now_s` (seconds since the Unix epoch)."""
    location = _location(files.root, files.run)
    try:
        cfg = saved_config(files.read[CONFIG_FILE], storage.join(location, CONFIG_FILE))
    except ConfigError:  # an unreadable config.yaml leaves the rest of its row readable
        cfg = None
    attempts = attempts_from(storage.parse_json(files.read[ENVIRONMENT_FILE]))
    progress = _progress(files, cfg.schedule.epochs if cfg else None, attempts.wall_time_s, now_s)
    return RunStatus(name=_display(files.root, files.run),
                     sweep=None if files.sweep is None else _display(files.root, files.sweep), run_dir=location,
                     model=cfg.model if cfg else None, recipe=cfg.recipe if cfg else None, status=progress.status,
                     epoch=progress.epoch, epochs=progress.epochs, test_acc=progress.test_acc,
                     best_test_acc=progress.best_test_acc, wall_time_s=progress.wall_time_s,
                     started=attempts.first_started, host=attempts.last_host, last_write=_utc(files.last_write_s),
                     holder=_holder_record(files.holder, now_s))


def _holder_record(holder: lease.Holder | None, now_s: float) -> dict | None:
    if holder is None:
        return None
    return {"host": holder.host, "pid": holder.pid, "since": _utc(holder.claimed_s),
            "heartbeat_age_s": round(holder.age_s(now_s), 1)}


class Progress(NamedTuple):
    """The columns of a row that say how far the run got (as in RunStatus)."""

    status: str
    epoch: int
    epochs: int | None
    test_acc: float | None
    best_test_acc: float | None
    wall_time_s: float


def _progress(files: RunFiles, epochs: int | None, wall_time_s: float, now_s: float) -> Progress:
    """How far the run got: from result.json where it tells how the run ended, else from its latest checkpoint and
    environment.json's attempt durations (`wall_time_s`), and running or interrupted by its latest write."""
    result = result_from(storage.parse_json(files.read[RESULT_FILE]))
    if ended(result, epochs):
        return Progress(result.status, result.epoch, result.epochs, result.final_test_acc, result.best_test_acc,
                        result.wall_time_s)
    # The epoch of a run under way or interrupted: its latest committed checkpoint's, from the metrics Ray Train
    # keeps beside it in its snapshot file (a few kB of JSON). That is where a resume starts, and the cheapest
    # source: tb/'s event files would have to be downloaded and parsed, and a checkpoint.pt is MBs of torch.
    committed = committed_epoch(storage.parse_json(files.read[SNAPSHOT_FILE]))
    status = "running" if files.holder or now_s - files.last_write_s < RUNNING_WITHIN_S else "interrupted"
    return Progress(status, committed.epoch, epochs, committed.test_acc, committed.best_test_acc, wall_time_s)


def ended(result: RunResult | None, epochs: int | None) -> bool:
    """Whether result.json says how the run ended: a diverged (or other) status does; "finished" only for every
    epoch of config.yaml (a rerun with schedule.epochs raised trains on, and rewrites result.json at its end)."""
    if result is None:
        return False
    return result.status != "finished" or (result.finished and result.epoch >= (epochs or result.epochs))


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _no_runs(root: str, what_it_is: str) -> NoRunDirsError:
    return NoRunDirsError(f"{root} {what_it_is}: expected dirs holding {CONFIG_FILE}, as `ray-resnet train` and "
                          "`ray-resnet sweep` write them; pass where they went (--storage: runs by default, "
                          "runs/sweeps for sweeps, or a URI such as s3://bucket/runs)")


def status_json(rows: list[RunStatus]) -> str:
    """One JSON document: a list of row objects (RunStatus's fields)."""
    return json.dumps([dataclasses.asdict(row) for row in rows], indent=1)


def status_table(rows: list[RunStatus]) -> str:
    """The table, a line of counts, and what the statuses mean."""
    cells = [COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(text.rjust(width) if column in RIGHT_ALIGNED else text.ljust(width)
                       for column, text, width in zip(COLUMNS, line, widths)).rstrip() for line in cells]
    return "\n".join([*lines, "", _counts(rows), *_footnote()])


def _cells(row: RunStatus) -> tuple[str, ...]:
    return (row.name, row.model or "?", row.recipe or "?", row.status, f"{row.epoch}/{row.epochs or '?'}",
            _percent(row.test_acc), _percent(row.best_test_acc), clock(row.wall_time_s), _minute(row.started),
            _host(row))


def _host(row: RunStatus) -> str:
    """Where the latest attempt's driver ran; for a run a driver holds now, that driver and its last beat."""
    if row.holder is None:
        return row.host or "—"
    return f"{row.holder['host']} (pid {row.holder['pid']}, beat {row.holder['heartbeat_age_s']:.0f} s ago)"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _minute(started: str | None) -> str:
    """An ISO 8601 time as `2026-12-06 12:20` in UTC (as recorded where it is not ISO 8601; — for none)."""
    if not started:
        return "—"
    try:
        when = datetime.datetime.fromisoformat(started)
    except ValueError:
        return started
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _counts(rows: list[RunStatus]) -> str:
    """`5 runs: 2 finished, 1 diverged, ...; sweep table6: 2 trials (1 finished, 1 running)`."""
    def tally(some: list[RunStatus]) -> str:
        counts = Counter(r.status for r in some)
        order = [*STATUS_ORDER, *sorted(set(counts) - set(STATUS_ORDER))]
        return ", ".join(f"{counts[status]} {status}" for status in order if counts[status])

    sweeps = {r.sweep: [s for s in rows if s.sweep == r.sweep] for r in rows if r.sweep is not None}
    parts = [f"{len(rows)} run{'s' if len(rows) != 1 else ''}: {tally(rows)}",
             *(f"sweep {name}: {len(trials)} trials ({tally(trials)})" for name, trials in sweeps.items())]
    return "; ".join(parts)


def _footnote() -> list[str]:
    minutes = RUNNING_WITHIN_S // 60
    return textwrap.wrap(
        f"running: no result.json yet and a file written in the last {minutes} minutes or a driver holding its lease; "
        "interrupted: neither (rerun its command to resume it; a sweep's trial may also have been stopped early by "
        "ASHA). Without result.json, epoch and accuracies are the latest checkpoint's (where a resume starts). "
        "Accuracies in %; host: where the latest attempt's driver ran, or the pid and last heartbeat of the driver "
        "holding the run now.", FOOTNOTE_WIDTH)
