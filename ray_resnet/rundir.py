"""A run dir, `<run.storage>/<run.name>/` (pure: no Ray): what the driver reads before it starts training. Its
location is a local path or a URI (see storage.py).

It holds `config.yaml` (the resolved config), `environment.json` (where each attempt ran), Ray Train's
`checkpoint_*` dirs (the latest `run.keep_checkpoints`) and its `checkpoint_manager_snapshot.json`,
`best/checkpoint.pt`, `tb/` (TensorBoard, rank 0; tb/steps: the step-axis scalars) and, once the run has
finished, `result.json`.
"""

from __future__ import annotations

import json
import os

from . import config as config_lib
from . import storage
from .checkpoint import load_checkpoint
from .config import Config
from .constants import CONFIG_FILE, ENVIRONMENT_FILE, RESULT_FILE
from .errors import CheckpointError, DivergedError, RunError

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


def previous_result(cfg: Config) -> dict | None:
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
    result = storage.read_json(storage.join(directory, RESULT_FILE))
    if result and result.get("status") == "diverged":
        raise diverged_error(result)
    if is_finished(result) and result["epoch"] >= cfg.schedule.epochs:
        return result
    return None


def is_finished(result: dict | None) -> bool:
    """Whether a result.json says its run trained every epoch (files from before "status" existed count too)."""
    return bool(result) and result.get("status", "finished") == "finished" and \
        result.get("epoch", 0) >= result.get("epochs", 1)


def diverged_error(result: dict) -> DivergedError:
    """The error of a run whose training loss became NaN/inf (`result`: its result.json)."""
    stop = result["diverged"]
    where = (f"the last good checkpoint is {result['checkpoint']} (epoch {result['epoch']}), left intact"
             if result.get("checkpoint") else "no checkpoint was written before it")
    return DivergedError(f"run {result['name']}: training loss became {stop['loss']} in epoch {stop['epoch']}; "
                         f"stopped without retrying: {where}; lower optim.lr (or raise schedule.warmup_epochs) and "
                         "start a new --name")


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The checkpoint Ray Train will resume from: the latest one its snapshot file has committed."""
    snapshot = storage.read_json(storage.join(directory, SNAPSHOT_FILE)) or {}
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return storage.join(directory, latest) if latest else None


def check_resumable(directory: str) -> int:
    """Epoch of the checkpoint a rerun resumes from (0: none); a corrupt one stops here, not in N retries."""
    path = latest_checkpoint(directory)
    if path is None:
        return 0
    try:
        return load_checkpoint(path)["epoch"]
    except CheckpointError as e:
        raise RunError(f"cannot resume {storage.name(directory)}: {e}. Move that checkpoint dir aside to resume from an "
                       "older one, or pass --name for a fresh run") from None


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


def write_result(directory: str, summary: dict) -> None:
    """result.json: a finished run's summary ("status": "finished"), or a diverged one's ("diverged")."""
    # One line: in a sweep the run dir is also the Tune trial dir, whose result.json Tune reads as JSON lines.
    storage.write_text(storage.join(directory, RESULT_FILE), json.dumps(summary) + "\n")
