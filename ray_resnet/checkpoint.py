"""The checkpoint file format (pure PyTorch): one `checkpoint.pt` per checkpoint directory.

It holds only tensors and plain Python values, so it is always read with `torch.load(weights_only=True)`:
a run dir never gets to execute pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FILENAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not ours; the message says which file and what to do."""


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
    for candidate in (path, path / FILENAME, path / "best" / FILENAME):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no checkpoint at {path}: expected a {FILENAME} file, a checkpoint dir holding one, "
        f"or a run dir with best/{FILENAME}"
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
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{file} is not a ray-resnet checkpoint (no 'model'/'config' entries)")
    return state
