"""The checkpoint (pure PyTorch): what one holds, and its file, one `checkpoint.pt` per checkpoint directory.

It holds only tensors and plain Python values, so it is always read with `torch.load(weights_only=True)`:
a run dir never gets to execute pickled code. Every module reads checkpoints through this one.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
from torch import nn

from .constants import BEST_DIR
from . import storage
from .errors import CheckpointError

FILENAME = "checkpoint.pt"


@dataclass
class Progress:
    """How far a run has got: what the training loop carries from epoch to epoch besides the model."""

    epoch: int = 0  # epochs finished
    best_test_acc: float = 0.0  # of the best epoch (chosen on val_acc with a val split, else on test_acc)
    best_epoch: int = 0  # 0: none yet
    best_model: dict | None = None  # the state dict of the best epoch's model (best/ is rewritten from it)
    best_metrics: dict | None = None
    best_val_acc: float = 0.0  # of the best epoch, with a val split (checkpoints from before val splits lack it)

    def best_score(self, metric: str) -> float:
        """The best epoch's value of the metric best/ is selected on ("val_acc" or "test_acc")."""
        return self.best_val_acc if metric == "val_acc" else self.best_test_acc

    def new_best(self, core: nn.Module, metrics: dict) -> None:
        self.best_test_acc, self.best_epoch, self.best_metrics = metrics["test_acc"], metrics["epoch"], metrics
        self.best_val_acc = metrics.get("val_acc", 0.0)
        self.best_model = {k: v.detach().clone() for k, v in core.state_dict().items()}


def training_state(core: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   progress: Progress, config: dict, metrics: dict, pixel_mean: torch.Tensor | None = None) -> dict:
    """Everything a run resumes from (the best epoch's model included), plus the resolved config, the epoch's
    metrics and the mean image inputs are normalised by (data.normalize pixel_mean; for eval)."""
    model = core.state_dict()
    best = model if progress.best_epoch == progress.epoch else progress.best_model  # one copy when they agree
    return {
        "model": model, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": progress.epoch, "best_test_acc": progress.best_test_acc, "best_epoch": progress.best_epoch,
        "best_val_acc": progress.best_val_acc,
        "best": {"model": best, "metrics": progress.best_metrics} if best is not None else None,
        "rng": {"torch": torch.get_rng_state()}, "config": config, "metrics": metrics,
        "pixel_mean": None if pixel_mean is None else pixel_mean.cpu(),
    }


def restore_training_state(state: dict, core: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler) -> Progress:
    """Load `state` (from training_state) into the model, optimizer and schedule; returns where the run was."""
    core.load_state_dict(model_weights(state))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    best = state.get("best") or {}
    return Progress(state["epoch"], state["best_test_acc"], state["best_epoch"], best.get("model"),
                    best.get("metrics"), state.get("best_val_acc", 0.0))


def best_checkpoint(state: dict) -> dict:
    """What best/ holds, from a training state: the best epoch's model, metrics and the config (no optimizer)."""
    best = state["best"]
    return {"model": best["model"], "config": state["config"], "epoch": state["best_epoch"], "kind": "best",
            "metrics": best["metrics"], "best_test_acc": state["best_test_acc"], "best_epoch": state["best_epoch"],
            "best_val_acc": state.get("best_val_acc", 0.0), "pixel_mean": state.get("pixel_mean")}


def sync_best(state: dict | None, best_dir: str) -> None:
    """Make best/ agree with the checkpoint a run resumes from (`state`; None: from the start): after a crash it may
    hold the model of an epoch that is now trained again."""
    best_file = storage.join(best_dir, FILENAME)
    if state is None or not state.get("best"):
        storage.remove(best_file)
        return
    try:
        current = read_state(best_file).get("epoch")
    except (OSError, CheckpointError):  # missing or unreadable: rewrite it
        current = None
    if current != state["best_epoch"]:
        save_checkpoint(best_checkpoint(state), best_dir)


def is_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and "model" in obj and "config" in obj


def model_weights(state: dict) -> dict[str, torch.Tensor]:
    """The model's state dict in a checkpoint."""
    return state["model"]


def describe(state: dict) -> dict:
    """What a checkpoint says about its model: {"model", "dataset", "epoch", "config", "kind", "pixel_mean"}; kind
    "best" for best/ (the epoch of the highest validation accuracy, or without a val split test accuracy), else
    "epoch" (the model after that epoch); pixel_mean: the mean image its inputs are normalised by, or None."""
    config = state["config"]
    return {"model": config.get("model"), "dataset": config.get("data", {}).get("dataset"),
            "epoch": state.get("epoch"), "config": config, "kind": state.get("kind", "epoch"),
            "pixel_mean": state.get("pixel_mean")}


def save_checkpoint(state: dict, directory: str | os.PathLike) -> str:
    """Write atomically: a crash mid-save leaves a temp file, never a half-written checkpoint.pt."""
    location = storage.join(directory, FILENAME)
    with storage.atomic_file(location) as f:
        torch.save(state, f)
    return location


def resolve_checkpoint(location: str | os.PathLike) -> str:
    """A checkpoint.pt file, a checkpoint dir, or a run dir (its best checkpoint), local or a URI -> the file."""
    location = storage.absolute(location)
    for candidate in (location, storage.join(location, FILENAME), storage.join(location, BEST_DIR, FILENAME)):
        if storage.is_file(candidate):
            return candidate
    raise CheckpointError(
        f"no checkpoint at {location}: expected a {FILENAME} file, a checkpoint dir holding one, "
        f"or a run dir with {BEST_DIR}/{FILENAME}"
    )


def read_state(file: str) -> object:
    """torch.load of a file, local or a URI, with weights_only=True: tensors and plain values, never code."""
    data = storage.read_bytes(file)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
        raise CheckpointError(
            f"cannot read checkpoint {file} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is truncated or not a ray-resnet checkpoint: pick another one (nothing was deleted)"
        ) from None


def load_checkpoint(location: str | os.PathLike) -> dict:
    file = resolve_checkpoint(location)
    state = read_state(file)
    if not is_checkpoint(state):
        raise CheckpointError(f"{file} is not a ray-resnet checkpoint (no 'model'/'config' entries)")
    return state
