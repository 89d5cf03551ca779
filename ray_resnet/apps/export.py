"""Export a trained model for use without ray-resnet (pure PyTorch), and check the file gives the same logits.

Formats: `state_dict` (a plain `torch.save(model.state_dict())`, what `ray-resnet eval --weights` and most
code read), `torchscript` (`torch.jit.script`: runs without this package; torch 2.14 marks TorchScript
deprecated, but C++/mobile users still ask for it), `onnx` (needs `pip install ray-resnet[export]`). All take
normalised float32 images [B,3,32,32] (`ray_resnet.core.augment.normalize`) with any batch size, and return logits.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ray_resnet.core.models import build_model
from ray_resnet.errors import ExportError
from ray_resnet.io import storage

FORMATS = {"state_dict": ".pt", "torchscript": ".ts.pt", "onnx": ".onnx"}


def onnx_missing() -> list[str]:
    """Packages `torch.onnx.export` (dynamo exporter) and the logit check need that are not installed."""
    return [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]


def export_model(model: nn.Module, fmt: str, path: str | Path) -> Path:
    """Write `model` (eval mode, CPU, float32) to `path` in format `fmt`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    if fmt == "state_dict":
        torch.save(model.state_dict(), path)
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # the deprecation is documented above; the user asked for this format
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(model).save(str(path))
    else:
        missing = onnx_missing()
        if missing:
            raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install 'ray-resnet[export]'")
        example = torch.zeros(2, 3, 32, 32)
        # external_data=False: one self-contained file (torch 2.14 otherwise puts the weights in FILE.data).
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False, verbose=False)
    return path


def exported_logits(path: str | Path, fmt: str, images: torch.Tensor, model_name: str | None = None,
                    num_classes: int = 10) -> torch.Tensor:
    """Reload an exported file on its own (no ray-resnet model object involved but for state_dict) and run it."""
    path = Path(path)
    with torch.no_grad():
        if fmt == "state_dict":
            from ray_resnet.core.weights import load_weights, read_weights

            model = build_model(model_name, num_classes).eval()
            load_weights(model, read_weights(path)[0], str(path))
            return model(images)
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu")(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


@dataclass(frozen=True)
class ExportCheck:
    """An exported file and how its reloaded logits compare with the model's on a batch."""

    file: str
    bytes: int
    max_abs_logit_diff: float
    same_logits: bool  # within 1e-4 (ONNX Runtime's kernels differ from torch's in float32 rounding)
    same_top1: int  # images of the batch with the same top-1 class


def export_and_check(model: nn.Module, fmt: str, output: str | Path, images: torch.Tensor, model_name: str,
                     num_classes: int) -> ExportCheck:
    """Export, reload the file and compare its logits with the model's on `images` (normalised float32).

    `output`: a local path or a URI; a URI gets the file once it has passed the check here."""
    output = storage.absolute(output)
    if storage.exists(output):  # never overwrite: an earlier export may be in use
        raise ExportError(f"{output} already exists; pass another --output or delete it first")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / storage.name(output) if storage.is_uri(output) else Path(output)
        export_model(model, fmt, path)
        with torch.no_grad():
            expected = model(images)
        got = exported_logits(path, fmt, images, model_name, num_classes)
        if storage.is_uri(output):
            storage.write_atomic(output, path.read_bytes())
        size = path.stat().st_size
    # 1e-4: ONNX Runtime's kernels differ from torch's in float32 rounding (seen: 1.5e-5 on ResNet-20 logits).
    return ExportCheck(file=output, bytes=size, max_abs_logit_diff=(got - expected).abs().max().item(),
                       same_logits=torch.allclose(got, expected, rtol=1e-4, atol=1e-4),
                       same_top1=int((got.argmax(1) == expected.argmax(1)).sum()))
