"""The checkpoint (pure PyTorch): what one holds, and its file, one `checkpoint.pt` per checkpoint directory.

It holds only tensors and plain Python values, so it is always read with `torch.load(weights_only=True)`:
a run dir never gets to execute pickled code. Every module reads checkpoints through this one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .constants import BEST_DIR
from .errors import CheckpointError

FILENAME = "checkpoint.pt"


@dataclass
class Progress:
    """How far a run has got: what the training loop carries from epoch to epoch besides the model."""

    epoch: int = 0  # epochs finished
    best_test_acc: float = 0.0
    best_epoch: int = 0  # 0: none yet


def training_state(core: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   progress: Progress, config: dict, metrics: dict) -> dict:
    """Everything a run resumes from, plus the resolved config and the epoch's metrics (for eval and export)."""
    return {
        "model": core.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": progress.epoch, "best_test_acc": progress.best_test_acc, "best_epoch": progress.best_epoch,
        "rng": {"torch": torch.get_rng_state()}, "config": config, "metrics": metrics,
    }


def restore_training_state(state: dict, core: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler) -> Progress:
    """Load `state` (from training_state) into the model, optimizer and schedule; returns where the run was."""
    core.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    return Progress(state["epoch"], state["best_test_acc"], state["best_epoch"])


def is_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and "model" in obj and "config" in obj


def describe(state: dict) -> dict:
    """What a checkpoint says about its model: {"model", "dataset", "epoch", "config"}."""
    config = state["config"]
    return {"model": config.get("model"), "dataset": config.get("data", {}).get("dataset"),
            "epoch": state.get("epoch"), "config": config}


def save_checkpoint(state: dict, directory: str | Path) -> Path:
    """Write atomically: a crash mid-save leaves a `.tmp` file, never a half-written checkpoint.pt."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint.pt file, a checkpoint dir, or a run dir (its best checkpoint) -> the file."""
    path = Path(path).expanduser()
    for candidate in (path, path / FILENAME, path / BEST_DIR / FILENAME):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no checkpoint at {path}: expected a {FILENAME} file, a checkpoint dir holding one, "
        f"or a run dir with {BEST_DIR}/{FILENAME}"
    )


def load_checkpoint(path: str | Path) -> dict:
    file = resolve_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
        raise CheckpointError(
            f"cannot read checkpoint {file} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is truncated or not a ray-resnet checkpoint: pick another one (nothing was deleted)"
        ) from None
    if not is_checkpoint(state):
        raise CheckpointError(f"{file} is not a ray-resnet checkpoint (no 'model'/'config' entries)")
    return state
