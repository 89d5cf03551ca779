"""Tiny CIFAR-shaped datasets written in the real on-disk formats (HuggingFace parquet, torchvision pickles)."""

from __future__ import annotations

import io
import pickle
import re
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

# The session's finished run (conftest's `finished_run`): 2 epochs of 4 steps (256 images in batches of 64), a
# step-axis point every 3rd step (steps 3 and 6), 200 test images, 1 worker.
FINISHED_RUN_EPOCHS = 2
FINISHED_RUN_LOG_EVERY_STEPS = 3


def random_cifar(n: int, num_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images uint8 [n,3,32,32] and labels int64 [n], as balanced across classes as n allows."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


def colour_coded_cifar(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An easy 10-class set: each class one colour plus per-pixel noise. A ResNet-20 learns it within an epoch
    of a thousand images, so a good and a useless learning rate differ by tens of points on any CPU."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    palette = torch.tensor([[(c * 37) % 256, (c * 91) % 256, (c * 157) % 256] for c in range(10)], dtype=torch.float)
    images = palette[labels][:, :, None, None] + 25 * torch.randn(n, 3, 32, 32, generator=g)
    return images.clamp(0, 255).to(torch.uint8), labels


def _png(image_chw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_cifar(dirpath, images_uint8_nchw, labels, split, dataset="cifar10", shards=1) -> list[Path]:
    """Write ``split`` in the HuggingFace uoft-cs/cifar10 (or cifar100) parquet schema.

    shards=1 writes dirpath/{split}.parquet; more writes dirpath/{split}-0000i-of-0000n.parquet
    like the HF repo. CIFAR-100 gets fine_label and a coarse_label (fine // 5, not the real map).
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    images, labels = np.asarray(images_uint8_nchw), np.asarray(labels, dtype=np.int64)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    paths = []
    for i, rows in enumerate(np.array_split(np.arange(len(labels)), shards)):
        columns = {"img": pa.array([{"bytes": _png(images[r]), "path": None} for r in rows], type=img_type)}
        if dataset == "cifar10":
            columns["label"] = pa.array(labels[rows], type=pa.int64())
        else:
            columns["fine_label"] = pa.array(labels[rows], type=pa.int64())
            columns["coarse_label"] = pa.array(labels[rows] // 5, type=pa.int64())
        name = f"{split}.parquet" if shards == 1 else f"{split}-{i:05d}-of-{shards:05d}.parquet"
        paths.append(dirpath / name)
        pq.write_table(pa.table(columns), paths[-1])
    return paths


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are protocol-2 (Python 2) pickles


def _batch(images: np.ndarray, labels: np.ndarray, batch_label: str, label_keys: list[bytes]) -> dict:
    batch = {
        b"batch_label": batch_label.encode(),
        b"data": images.reshape(len(images), 3 * 32 * 32),  # CHW rows, like the real files
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))],
    }
    for key in label_keys:
        batch[key] = [int(x) // 5 if key == b"coarse_labels" else int(x) for x in labels]
    return batch


def write_torchvision_cifar(root, train_images, train_labels, test_images, test_labels, dataset="cifar10") -> Path:
    """Write torchvision's layout: root/cifar-10-batches-py (5 train batches + test_batch) or root/cifar-100-python."""
    train_images, test_images = np.asarray(train_images, dtype=np.uint8), np.asarray(test_images, dtype=np.uint8)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if dataset == "cifar10":
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i, rows in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
            batch = _batch(train_images[rows], train_labels[rows], f"training batch {i} of 5", [b"labels"])
            _dump(folder / f"data_batch_{i}", batch)
        _dump(folder / "test_batch", _batch(test_images, test_labels, "testing batch 1 of 1", [b"labels"]))
        _dump(folder / "batches.meta", {b"label_names": [f"class_{c}".encode() for c in range(10)]})
    else:
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        keys = [b"fine_labels", b"coarse_labels"]
        _dump(folder / "train", _batch(train_images, train_labels, "training batch 1 of 1", keys))
        _dump(folder / "test", _batch(test_images, test_labels, "testing batch 1 of 1", keys))
        _dump(
            folder / "meta",
            {
                b"fine_label_names": [f"fine_{c}".encode() for c in range(100)],
                b"coarse_label_names": [f"coarse_{c}".encode() for c in range(20)],
            },
        )
    return folder


def trained_like(name="resnet20", num_classes=10, seed=0):
    """A model whose weights and BN statistics differ from a fresh one, so a skipped key would show."""
    from ray_resnet.core.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    model.train()
    with torch.no_grad():  # one train-mode pass moves the BN running statistics away from 0 / 1
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


# "(PlacementGroupCleaner pid=123) ...": Ray prefixes every line its actors print; a session-wide Ray started by
# an earlier test may print such lines into any later test's captured stderr. "(autoscaler +25s) ...": the cluster
# events Ray's driver prints as they come, also after the process's own last line.
_RAY_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((\w+ pid=\d+|autoscaler \+)")


def own_lines(text: str) -> list[str]:
    """The non-empty lines of captured output that this process printed, without Ray's actor and autoscaler lines."""
    return [line for line in text.strip().splitlines() if line.strip() and not _RAY_LINE.match(line)]


def train_controller_pids() -> list[int]:
    """The pids of every Ray Train controller actor the connected Ray has known, live or dead."""
    from ray.util.state import list_actors

    return [actor.pid for actor in list_actors(filters=[("class_name", "=", "TrainController")], detail=True,
                                                limit=10_000, raise_on_missing_output=False) if actor.pid]


def still_running_at(pids: set[int], deadline: float) -> set[int]:
    """Those of `pids` whose process still exists once all have ended or `deadline` (time.monotonic()) has passed."""
    while (running := set(filter(psutil.pid_exists, pids))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running
