"""A run dir, `<run.storage>/<run.name>/` (pure: no Ray): what the driver reads before it starts training.

It holds `config.yaml` (the resolved config), Ray Train's `checkpoint_*` dirs (the latest `run.keep_checkpoints`)
and its `checkpoint_manager_snapshot.json`, `best/checkpoint.pt`, `tb/` (TensorBoard, rank 0) and, once the run
has finished, `result.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import config as config_lib
from .checkpoint import load_checkpoint
from .config import Config
from .constants import CONFIG_FILE, RESULT_FILE
from .errors import CheckpointError, DivergedError, RunError
from .storage import read_json, write_text

# Ray Train's record of the checkpoints it has committed; a rerun resumes from its latest.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def default_run_name(cfg: Config) -> str:
    return f"{cfg.model}-{cfg.data.dataset}-s{cfg.seed}"


def resolve_run(cfg: Config) -> Config:
    """Fill in the run name and make paths absolute, so the saved config reruns from anywhere."""
    if "://" in cfg.run.storage:
        raise RunError(f"run.storage={cfg.run.storage!r} is a URI, but run dirs (config.yaml, best/, tb/) are "
                       "written as files: use a directory every node mounts (EFS on AWS, Filestore on GCP, NFS "
                       "on-premise; see cluster/README.md), e.g. --storage /mnt/shared/runs")
    return config_lib.replace(cfg, data={"root": str(Path(cfg.data.root).expanduser().resolve())},
                              run={"name": cfg.run.name or default_run_name(cfg),
                                   "storage": str(Path(cfg.run.storage).expanduser().resolve())})


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.storage) / cfg.run.name


def previous_result(cfg: Config) -> dict | None:
    """The finished result of this run name, if it is finished; raises if the run dir holds another recipe."""
    directory = run_dir(cfg)
    saved = directory / CONFIG_FILE
    if not saved.is_file():
        return None
    old = config_lib.to_dict(config_lib.read_config(saved))
    changes = config_lib.recipe_changes(old, config_lib.to_dict(cfg))
    if changes:
        raise RunError(f"run dir {directory} holds a run with another config ({'; '.join(changes[:4])}); "
                       "pass a new --name, or delete that dir to start over")
    result = read_json(directory / RESULT_FILE)
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


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint Ray Train will resume from: the latest one its snapshot file has committed."""
    snapshot = directory / SNAPSHOT_FILE
    if not snapshot.is_file():
        return None
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return directory / latest if latest else None


def check_resumable(directory: Path) -> int:
    """Epoch of the checkpoint a rerun resumes from (0: none); a corrupt one stops here, not in N retries."""
    path = latest_checkpoint(directory)
    if path is None:
        return 0
    try:
        return load_checkpoint(path)["epoch"]
    except CheckpointError as e:
        raise RunError(f"cannot resume {directory.name}: {e}. Move that checkpoint dir aside to resume from an "
                       "older one, or pass --name for a fresh run") from None


def write_config(cfg: Config) -> None:
    directory = run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(cfg, directory / CONFIG_FILE)


def write_result(directory: Path, summary: dict) -> None:
    """result.json: a finished run's summary ("status": "finished"), or a diverged one's ("diverged")."""
    # One line: in a sweep the run dir is also the Tune trial dir, whose result.json Tune reads as JSON lines.
    write_text(directory / RESULT_FILE, json.dumps(summary) + "\n")
