"""A run dir, `<run.storage>/<run.name>/` (pure: no Ray): what the driver reads before it starts training. Its
location is a local path or a URI (see storage.py).

It holds `config.yaml` (the resolved config), `environment.json` (where each attempt ran), Ray Train's
`checkpoint_*` dirs (the latest `run.keep_checkpoints`) and its `checkpoint_manager_snapshot.json`,
`best/checkpoint.pt`, `tb/` (TensorBoard, rank 0; tb/steps: the step-axis scalars) and, once the run has
finished, `result.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ray_resnet import config as config_lib
from ray_resnet.config import Config
from ray_resnet.constants import CONFIG_FILE, ENVIRONMENT_FILE, RESULT_FILE
from ray_resnet.errors import DivergedError, RunError
from ray_resnet.io import storage

# Ray Train's record of the checkpoints it has committed; a rerun resumes from its latest.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def default_run_name(cfg: Config) -> str:
    return f"{cfg.model}-{cfg.data.dataset}-s{cfg.seed}"


def resolve_run(cfg: Config) -> Config:
    """Fill in the run name and make local paths absolute, so the saved config reruns from anywhere."""
    return config_lib.replace(cfg, data={"root": storage.absolute(cfg.data.root)},
                              run={"name": cfg.run.name or default_run_name(cfg),
                                   "storage": storage.absolute(cfg.run.storage)})


def run_dir(cfg: Config) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


@dataclass(frozen=True)
class RunResult:
    """result.json: how a run ended ("finished" or "diverged"), its accuracies and where its files are. A rerun of a
    finished run returns it with already_finished (never written)."""

    epoch: int  # epochs trained
    epochs: int  # schedule.epochs
    name: str | None = None
    model: str | None = None
    dataset: str | None = None
    seed: int | None = None
    status: str = "finished"  # or "diverged", or "error": a sweep trial's error that any rerun would raise again
    params: int | None = None
    final_test_acc: float | None = None
    best_test_acc: float | None = None  # the test accuracy of best/'s epoch
    best_epoch: int | None = None
    best_selected_on: str | None = None  # in words: the validation set, or the test set (optimistic)
    best_val_acc: float | None = None  # with data.val_split
    final_val_acc: float | None = None
    wall_time_s: float = 0.0  # every attempt's duration, added up (seconds)
    last_attempt_s: float = 0.0
    attempts: int = 1
    run_dir: str | None = None
    checkpoint: str | None = None  # the latest committed checkpoint
    best_checkpoint: str | None = None
    worker_nodes: list | None = None
    diverged_loss: float | None = None  # where the loss became NaN/inf
    diverged_epoch: int | None = None
    error: str | None = None  # status "error": the one-line message
    already_finished: bool = False

    @property
    def finished(self) -> bool:
        """Whether the run trained every epoch."""
        return self.status == "finished" and self.epoch >= self.epochs

    def to_json(self) -> str:
        """One line: in a sweep the run dir is also the Tune trial dir, whose result.json Tune reads as JSON lines."""
        skip = ("already_finished", "diverged_loss", "diverged_epoch")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        if self.status == "diverged":
            fields["diverged"] = {"loss": self.diverged_loss, "epoch": self.diverged_epoch}
        return json.dumps(fields) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        """A result.json's content; files from before "status", "attempts" or a flat "diverged_*" read as such."""
        known = {f.name for f in dataclasses.fields(cls)}
        stop = d.get("diverged") or {}
        return cls(**{k: v for k, v in d.items() if k in known},
                   **({"diverged_loss": stop.get("loss"), "diverged_epoch": stop.get("epoch")} if stop else {}))


def read_result(directory: str) -> RunResult | None:
    """A run dir's result.json, or None where there is none (or it is torn: the run is then not finished)."""
    return result_from(storage.read_json(storage.join(directory, RESULT_FILE)))


def result_from(d: dict | None) -> RunResult | None:
    """The RunResult of a result.json's content (None: no file, or a torn one)."""
    try:
        return RunResult.from_dict(d) if d else None
    except TypeError:  # a result.json missing required keys: written by something else
        return None


def previous_result(cfg: Config) -> RunResult | None:
    """The finished result of this run name, if it is finished; raises if the run dir holds another recipe."""
    directory = run_dir(cfg)
    saved = storage.join(directory, CONFIG_FILE)
    if not storage.is_file(saved):
        return None
    old = config_lib.to_dict(config_lib.read_config(saved))
    changes = config_lib.recipe_changes(old, config_lib.to_dict(cfg))
    if changes:
        raise RunError(f"run dir {directory} holds a run with another config ({'; '.join(changes[:4])}); "
                       "pass a new --name, or delete that dir to start over")
    result = read_result(directory)
    if result and result.status == "diverged":
        raise diverged_error(result)
    if result and result.finished and result.epoch >= cfg.schedule.epochs:
        return result
    return None


def diverged_error(result: RunResult) -> DivergedError:
    """The error of a run whose training loss became NaN/inf."""
    where = (f"the last good checkpoint is {result.checkpoint} (epoch {result.epoch}), left intact"
             if result.checkpoint else "no checkpoint was written before it")
    return DivergedError(f"run {result.name}: training loss became {result.diverged_loss} in epoch "
                         f"{result.diverged_epoch}; stopped without retrying: {where}; lower optim.lr (or raise "
                         "schedule.warmup_epochs) and start a new --name")


def trial_dirs(sweep_dir: str) -> list[str]:
    """The run dirs of a sweep dir: those holding a config.yaml, by name."""
    dirs = [storage.join(sweep_dir, name) for name in storage.list_names(sweep_dir)]
    return [d for d in dirs if storage.is_file(storage.join(d, CONFIG_FILE))]


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The checkpoint Ray Train will resume from: the latest one its snapshot file has committed."""
    latest = _latest_committed(storage.read_json(storage.join(directory, SNAPSHOT_FILE))).get("checkpoint_dir_name")
    return storage.join(directory, latest) if latest else None


def kept_checkpoints(directory: str | os.PathLike) -> list[str]:
    """Every checkpoint Ray Train's snapshot file keeps, newest epoch first."""
    snapshot = storage.read_json(storage.join(directory, SNAPSHOT_FILE)) or {}
    results = sorted(snapshot.get("checkpoint_results") or [], key=lambda r: -(r.get("metrics") or {}).get("epoch", 0))
    return [storage.join(directory, r["checkpoint_dir_name"]) for r in results if r.get("checkpoint_dir_name")]


def _latest_committed(snapshot: dict | None) -> dict:
    """The snapshot file's entry of the latest committed checkpoint: its dir name and the metrics reported with it."""
    return (snapshot or {}).get("latest_checkpoint_result") or {}


@dataclass(frozen=True)
class CommittedEpoch:
    """The epoch of a run's latest committed checkpoint (what a resume starts from) and its test accuracies (%), as
    the snapshot file keeps the metrics reported with it; epoch 0: no checkpoint yet."""

    epoch: int = 0
    test_acc: float | None = None
    best_test_acc: float | None = None


def committed_epoch(snapshot: dict | None) -> CommittedEpoch:
    """The CommittedEpoch of a checkpoint_manager_snapshot.json's content (None: no file yet)."""
    metrics = _latest_committed(snapshot).get("metrics") or {}
    return CommittedEpoch(metrics.get("epoch", 0), metrics.get("test_acc"), metrics.get("best_test_acc"))


@dataclass(frozen=True)
class Attempts:
    """What environment.json says of a run's attempts, read without torch (which io.environment needs to write
    it)."""

    count: int = 0
    first_started: str | None = None  # when the first attempt's driver started (UTC, ISO 8601)
    last_host: str | None = None  # the host name of the latest attempt's driver
    wall_time_s: float = 0.0  # every attempt's duration_s added up (seconds; rank 0 updates it after each epoch)


def attempts_from(record: dict | None) -> Attempts:
    """The Attempts of an environment.json's content (None: no file yet)."""
    attempts = (record or {}).get("attempts") or []
    if not attempts:
        return Attempts()
    return Attempts(len(attempts), attempts[0].get("started"), (attempts[-1].get("driver") or {}).get("host"),
                    sum(a.get("duration_s", 0.0) for a in attempts))


def write_config(cfg: Config) -> None:
    config_lib.save_config(cfg, storage.join(run_dir(cfg), CONFIG_FILE))


def _read_environment(directory: str) -> tuple[str, dict]:
    location = storage.join(directory, ENVIRONMENT_FILE)
    return location, storage.read_json(location) or {"attempts": []}


def record_attempt(directory: str, attempt: dict) -> int:
    """Add an attempt (environment.attempt) to environment.json; a resumed run keeps those before it. Returns the
    attempt's index, by which its workers and its end find it again."""
    location, record = _read_environment(directory)
    record["attempts"].append(attempt)
    storage.write_text(location, json.dumps(record, indent=1) + "\n")
    return len(record["attempts"]) - 1


def record_worker_group(directory: str, group: dict, attempt: int = -1) -> dict | None:
    """Add a worker group (environment.worker_group) to attempt `attempt` (default: the latest) of environment.json
    (rank 0 does this when the workers start; only the driver wrote the file before, and it waits for the workers
    now). Returns the worker group recorded before it, in this attempt or an earlier one (None: this is the first):
    the group that wrote the checkpoint a resumed group starts from."""
    location, record = _read_environment(directory)
    if not record["attempts"]:  # a torn file: keep the groups
        record["attempts"].append({"worker_groups": []})
    index = attempt % len(record["attempts"])
    previous = [g for a in record["attempts"][:index + 1] for g in a.get("worker_groups", [])]
    record["attempts"][index].setdefault("worker_groups", []).append(group)
    storage.write_text(location, json.dumps(record, indent=1) + "\n")
    return previous[-1] if previous else None


def record_duration(directory: str, attempt: int, duration_s: float) -> list[float]:
    """Set attempt `attempt`'s duration (seconds) in environment.json: rank 0 does after each epoch, so an attempt
    whose driver was killed keeps its time up to its last epoch; the driver does at the end. Returns every
    attempt's duration in order (0 for one killed before its workers started)."""
    location, record = _read_environment(directory)
    if attempt < len(record["attempts"]):
        record["attempts"][attempt]["duration_s"] = round(duration_s, 1)
        storage.write_text(location, json.dumps(record, indent=1) + "\n")
    return [a.get("duration_s", 0.0) for a in record["attempts"]]


def write_result(directory: str, result: RunResult) -> None:
    storage.write_text(storage.join(directory, RESULT_FILE), result.to_json())
