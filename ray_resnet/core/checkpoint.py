"""The checkpoint (pure PyTorch): what one holds, and its file, one `checkpoint.pt` per checkpoint directory.

It holds only tensors and plain Python values, so it is always read with `torch.load(weights_only=True)`:
a run dir never gets to execute pickled code. Every module reads checkpoints through this one.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass

import torch
from torch import nn

from ray_resnet.constants import BEST_DIR
from ray_resnet.errors import CheckpointError, CheckpointFormatError
from ray_resnet.io import storage

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


# 2: the format_version key; 1: files from before it (the same keys). A file of a newer format is refused.
FORMAT_VERSION = 2


@dataclass
class BestEpoch:
    model: dict[str, torch.Tensor]  # its state dict
    metrics: dict  # its epoch metrics


@dataclass
class CheckpointState:
    """What a checkpoint.pt holds. A training checkpoint has everything a run resumes from (the best epoch's model
    included); best/ (kind "best") holds the best epoch's model, metrics and config. `config` is the resolved config
    as config.yaml has it; pixel_mean the mean image inputs are normalised by (data.normalize pixel_mean)."""

    model: dict[str, torch.Tensor]
    config: dict
    epoch: int = 0  # epochs finished (best/: the best epoch)
    metrics: dict | None = None  # of that epoch
    kind: str = "epoch"  # "epoch": the model after `epoch`; "best": best/'s
    best_epoch: int = 0
    best_test_acc: float = 0.0
    best_val_acc: float = 0.0
    best: BestEpoch | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict | None = None
    pixel_mean: torch.Tensor | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def of_training(cls, training, progress: Progress, config: dict, metrics: dict,
                    pixel_mean: torch.Tensor | None = None) -> CheckpointState:
        """The state of `training` (a core.steps.Training) after `progress.epoch` epochs."""
        model = training.core.state_dict()
        best = model if progress.best_epoch == progress.epoch else progress.best_model  # one copy when they agree
        return cls(model=model, config=config, epoch=progress.epoch, metrics=metrics, best_epoch=progress.best_epoch,
                   best_test_acc=progress.best_test_acc, best_val_acc=progress.best_val_acc,
                   best=BestEpoch(best, progress.best_metrics) if best is not None else None,
                   optimizer=training.optimizer.state_dict(), scheduler=training.scheduler.state_dict(),
                   rng={"torch": torch.get_rng_state()}, pixel_mean=None if pixel_mean is None else pixel_mean.cpu())

    def restore(self, training) -> Progress:
        """Load this state into `training`'s model, optimizer and schedule; returns where the run was."""
        training.core.load_state_dict(self.model)
        training.optimizer.load_state_dict(self.optimizer)
        training.scheduler.load_state_dict(self.scheduler)
        torch.set_rng_state(self.rng["torch"])
        best = self.best or BestEpoch(None, None)
        return Progress(self.epoch, self.best_test_acc, self.best_epoch, best.model, best.metrics, self.best_val_acc)

    def best_only(self) -> CheckpointState:
        """What best/ holds: the best epoch's model, metrics and the config (no optimizer)."""
        return CheckpointState(model=self.best.model, config=self.config, epoch=self.best_epoch, kind="best",
                               metrics=self.best.metrics, best_epoch=self.best_epoch,
                               best_test_acc=self.best_test_acc, best_val_acc=self.best_val_acc,
                               pixel_mean=self.pixel_mean)

    def to_dict(self) -> dict:
        """Plain values and tensors only, as torch.load(weights_only=True) reads them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # no copies of the tensors
        out["best"] = {"model": self.best.model, "metrics": self.best.metrics} if self.best else None
        return out

    @classmethod
    def from_dict(cls, d: dict, file: str) -> CheckpointState:
        version = d.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointFormatError(f"{file} is a checkpoint of format {version}, written by a newer ray-resnet (this "
                                  f"one reads formats up to {FORMAT_VERSION}): upgrade ray-resnet to read it")
        known = {f.name for f in dataclasses.fields(cls)}
        best = d.get("best")
        return cls(**{k: v for k, v in d.items() if k in known - {"best", "format_version"}}, format_version=version,
                   best=BestEpoch(best["model"], best["metrics"]) if best else None)


def sync_best(state: CheckpointState | None, best_dir: str) -> None:
    """Make best/ agree with the checkpoint a run resumes from (`state`; None: from the start): after a crash it may
    hold the model of an epoch that is now trained again."""
    best_file = storage.join(best_dir, FILENAME)
    if state is None or not state.best:
        storage.remove(best_file)
        return
    try:
        current = load_checkpoint(best_file).epoch
    except (OSError, CheckpointError):  # missing or unreadable: rewrite it
        current = None
    if current != state.best_epoch:
        save_checkpoint(state.best_only(), best_dir)


def is_checkpoint(obj: object) -> bool:
    """Whether a loaded file is a ray-resnet checkpoint (not a plain state dict)."""
    return isinstance(obj, dict) and "model" in obj and "config" in obj


def save_checkpoint(state: CheckpointState, directory: str | os.PathLike) -> str:
    """Write atomically: a crash mid-save leaves a temp file, never a half-written checkpoint.pt."""
    location = storage.join(directory, FILENAME)
    with storage.atomic_file(location) as f:
        torch.save(state.to_dict(), f)
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


def load_checkpoint(location: str | os.PathLike) -> CheckpointState:
    file = resolve_checkpoint(location)
    state = read_state(file)
    if not is_checkpoint(state):
        raise CheckpointError(f"{file} is not a ray-resnet checkpoint (no 'model'/'config' entries)")
    return CheckpointState.from_dict(state, file)
