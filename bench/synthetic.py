"""CIFAR-shaped synthetic data that travels with the repository: seeded uint8 noise images and balanced labels.

Speed does not depend on what the pixels show, so the GPU check measures on this where the real dataset (about
180 MB of parquet) cannot come along. `write_cifar_batches` stores it in torchvision's pickle layout, which
`core.datasets.load_cifar` reads, for the steps that take a data root (the Ray steps).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ray_resnet.constants import NUM_CLASSES

IMAGE_SHAPE = (3, 32, 32)


def synthetic_cifar(train: int, test: int, seed: int = 0,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """{train,test}_{images,labels} as load_cifar gives them (uint8 [N,3,32,32], int64 [N]), made on `device`:
    the same numbers on every run with the same seed and device type."""
    generator = torch.Generator(device=device).manual_seed(seed)
    arrays = {}
    for split, count in (("train", train), ("test", test)):
        arrays[f"{split}_images"] = torch.randint(0, 256, (count, *IMAGE_SHAPE), generator=generator,
                                                  dtype=torch.uint8, device=device)
        classes = torch.arange(count, device=device) % NUM_CLASSES["cifar10"]  # balanced, as CIFAR-10's are
        arrays[f"{split}_labels"] = classes[torch.randperm(count, generator=generator, device=device)]
    return arrays


def write_cifar_batches(root: Path, arrays: dict[str, torch.Tensor]) -> Path:
    """`arrays` as torchvision's cifar-10-batches-py under `root` (the train split in 5 batches); returns root."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = [(f"data_batch_{i + 1}", part) for i, part in
             enumerate(np.array_split(np.arange(len(arrays["train_labels"])), 5))]
    for name, split, rows in (*((n, "train", p) for n, p in train),
                              ("test_batch", "test", np.arange(len(arrays["test_labels"])))):
        images = arrays[f"{split}_images"].cpu().numpy()[rows].reshape(len(rows), -1)  # CHW rows of 3072 bytes
        labels = arrays[f"{split}_labels"].cpu().numpy()[rows].tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": images, b"labels": labels}))
    return root
