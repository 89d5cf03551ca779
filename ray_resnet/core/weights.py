"""Load model weights from any file users have (pure PyTorch): a plain state dict, a ray-resnet checkpoint,
or a file of the most used reproduction (github.com/akamaster/pytorch_resnet_cifar10), which saves
`{"state_dict": DataParallel(model).state_dict(), "best_prec1": ...}`, so every key starts with `module.`.

Loading is strict: a missing, unexpected or wrongly shaped key is an error naming the keys, never a partial load
that silently evaluates at 10 %. Files are read with `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ray_resnet.constants import NUM_CLASSES, parse_model_name
from ray_resnet.core.checkpoint import CheckpointState, is_checkpoint, resolve_checkpoint
from ray_resnet.core.models import build_model
from ray_resnet.errors import WeightsError
from ray_resnet.io import storage

# Prefixes wrappers add to every key: nn.DataParallel / DDP ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# BatchNorm's step counter: files saved before PyTorch 0.4.1 lack it; torch sets it to 0 and eval never reads it.
OPTIONAL_SUFFIX = ".num_batches_tracked"
# How many key names an error message lists before it says "+N more".
LISTED_KEYS = 12


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file says about its model: its format and, for a ray-resnet checkpoint, what the run that
    wrote it recorded (kind "best" for best/, "epoch" for the model after `epoch`)."""

    file: str
    format: str  # "ray-resnet checkpoint", "{'state_dict': ...} wrapper" or "state dict"
    model: str | None = None
    dataset: str | None = None
    epoch: int | None = None
    epochs: int | None = None  # the run's schedule.epochs
    kind: str | None = None
    val_split: int | None = None  # the run's data.val_split: best/ was selected on held-out training images
    data_root: str | None = None  # where the run read its data, and its decoded-array cache
    data_cache_dir: str | None = None
    eval_batch_size: int = 500
    pixel_mean: torch.Tensor | None = None  # a data.normalize pixel_mean run's mean image

    @classmethod
    def of_checkpoint(cls, state: CheckpointState, file: str) -> WeightsFile:
        config = state.config  # as the run's config.yaml has it
        data = config.get("data", {})
        return cls(file=file, format="ray-resnet checkpoint", model=config.get("model"), dataset=data.get("dataset"),
                   epoch=state.epoch, epochs=config.get("schedule", {}).get("epochs"), kind=state.kind,
                   val_split=data.get("val_split"), data_root=data.get("root"), data_cache_dir=data.get("cache_dir"),
                   eval_batch_size=config.get("perf", {}).get("eval_batch_size", 500), pixel_mean=state.pixel_mean)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], WeightsFile]:
    """(state dict with wrapper prefixes removed, what the file says about its model).

    `path`: a local file or a URI (s3://...)."""
    path = storage.absolute(path)
    if not storage.is_file(path):
        raise WeightsError(f"weights file {path} not found")
    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        detail = detail.split(" was not an allowed global")[0][:200]  # drop torch's advice to allow it
        if "Unsupported global" not in detail:  # garbage, not a pickle of objects
            raise WeightsError(f"{path} is not a torch weights file ({detail}); expected "
                               "a state dict, a ray-resnet checkpoint.pt, or a {'state_dict': ...} file") from None
        # torch's own message suggests weights_only=False: exactly what must not happen with an untrusted file
        raise WeightsError(
            f"{path} holds pickled Python objects besides tensors ({detail}); they are refused as loading them could "
            "run code: re-save it as a plain state dict (torch.save(model.state_dict(), FILE)) where it came from"
        ) from None
    except Exception as e:  # not a torch file, or truncated
        raise WeightsError(
            f"cannot read {path} as torch weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "expected a state dict, a ray-resnet checkpoint.pt, or a {'state_dict': ...} file saved with torch.save"
        ) from None
    if is_checkpoint(obj):
        checkpoint = CheckpointState.from_dict(obj, path)
        info, obj = WeightsFile.of_checkpoint(checkpoint, path), checkpoint.model
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info, obj = WeightsFile(path, "{'state_dict': ...} wrapper"), obj["state_dict"]
    else:
        info = WeightsFile(path, "state dict")
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:LISTED_KEYS] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{path} holds no state dict (found {keys}); expected a dict of tensors, "
                           "a ray-resnet checkpoint, or a {'state_dict': ...} file")
    return strip_wrapper_prefixes(obj), info


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes that every key shares, in any nesting (`module.layer1.0.conv1.weight` and, from
    torch.compile(DDP(model)), `_orig_mod.module.layer1...` -> `layer1.0.conv1.weight`)."""
    while shared := next((p for p in WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)), None):
        state = {k[len(shared):]: v for k, v in state.items()}
    return state


def architecture(state: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """(depth, classes) of a CIFAR ResNet state dict: depth = 6n+2 from the n blocks of layer1, classes from
    the head; None where the keys do not tell."""
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.") and k.count(".") >= 2}
    head = state.get("linear.weight")
    return (6 * len(blocks) + 2 if blocks else None), (head.shape[0] if head is not None and head.dim() == 2 else None)


def shape_summary(state: dict[str, torch.Tensor]) -> str:
    """A state dict's depth and class count in words, for error messages."""
    depth, classes = architecture(state)
    head = f"{classes} classes (linear.weight {list(state['linear.weight'].shape)})" if classes else "no linear head"
    return f"depth {depth or '?'}, {head}"


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else ""
    return ", ".join(keys[:LISTED_KEYS]) + more


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the weights") -> None:
    """Strict load: every model key present with its shape, no extra keys; otherwise WeightsError, model untouched."""
    expected = model.state_dict()
    mismatch = [a != b for a, b in zip(architecture(state), architecture(expected)) if a and b]
    if any(mismatch):  # another depth or class count: name both shapes, rather than list 300 keys
        raise WeightsError(f"{source} are for a CIFAR ResNet of {shape_summary(state)}, but the model has "
                           f"{shape_summary(expected)}: pick the matching --model / --dataset")
    missing = sorted(k for k in expected.keys() - state.keys() if not k.endswith(OPTIONAL_SUFFIX))
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape)
    problems = [f"missing keys: {_listed(missing)}" if missing else "",
                f"unexpected keys: {_listed(unexpected)}" if unexpected else "",
                f"wrong shapes (file vs model): {_listed(wrong)}" if wrong else ""]
    if any(problems):
        raise WeightsError(f"{source} do not fit {type(model).__name__} ({shape_summary(expected)}): "
                           + "; ".join(p for p in problems if p) + ". Nothing was loaded")
    # strict=True still fills a missing num_batches_tracked: a dict without version metadata counts as pre-0.4.1.
    model.load_state_dict(state, strict=True)


def model_from_weights(path: str | Path, model: str | None = None, dataset: str | None = None
                       ) -> tuple[nn.Module, WeightsFile]:
    """Build `model` for `dataset` (defaults: what a ray-resnet checkpoint says, else cifar10) and load the file."""
    state, info = read_weights(path)
    model = model or info.model
    if not model:
        raise WeightsError(f"{path} is a {info.format} that does not name its model: pass --model "
                           f"(e.g. resnet20; the file has {shape_summary(state)})")
    dataset = dataset or info.dataset or "cifar10"
    try:
        parse_model_name(model)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    if dataset not in NUM_CLASSES:
        raise WeightsError(f"unknown dataset {dataset!r}; choose one of: {', '.join(NUM_CLASSES)}")
    net = build_model(model, NUM_CLASSES[dataset])
    load_weights(net, state, f"the weights in {path}")
    return net, replace(info, model=model, dataset=dataset)


def load_model(checkpoint: str | Path | None = None, weights: str | Path | None = None, model: str | None = None,
               dataset: str | None = None) -> tuple[nn.Module, WeightsFile]:
    """(model, info) from a checkpoint (a checkpoint.pt, a checkpoint dir, or a run dir: its best checkpoint) or a
    weights file, loaded strictly; `model`/`dataset` default to what the file says."""
    return model_from_weights(resolve_checkpoint(checkpoint) if checkpoint else weights, model, dataset)
