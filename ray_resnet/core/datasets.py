"""CIFAR-10/100 loading, caching, sharding and GPU-friendly augmentation.

Pure PyTorch: nothing here knows about Ray, so every piece is testable on a laptop.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision import datasets

from ray_resnet.config import cache_dir as resolve_cache_dir
from ray_resnet.constants import DATASETS, NUM_CLASSES
from ray_resnet.errors import DataError, DataNotFoundError
from ray_resnet.io import storage

# Bump when the cached array layout changes so old cache files are never read.
CACHE_FORMAT_VERSION = 1
_SPLITS = ("train", "test")


_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


# HuggingFace label column: uoft-cs/cifar100 has fine_label + coarse_label; the paper uses fine.
_PARQUET_LABEL = {"cifar10": "label", "cifar100": "fine_label"}


# HuggingFace repo layout: one config directory per dataset variant.
_PARQUET_CONFIG_DIRS = {"cifar10": ("plain_text",), "cifar100": ("plain_text", "cifar100")}


# torchvision's pickle layout: (folder, train files, test files, label key).
_PICKLE_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def load_cifar(
    root: str | os.PathLike,
    split: str,
    dataset: str = "cifar10",
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR split: images uint8 [N,3,32,32] contiguous NCHW, labels int64 [N].

    Sources under ``root`` (a local dir or a URI such as s3://bucket/cifar10), first match wins:
    HuggingFace parquet, then torchvision's pickle batches, then (``download=True``) a torchvision
    download (into a URI root through a local temp dir under ``cache_dir``). Decoded arrays are cached
    in ``cache_dir`` (local) keyed by the source files' locations, sizes and mtimes.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    root = storage.absolute(root)
    cache_dir = resolve_cache_dir(cache_dir)
    kind, files = _sources(root, dataset, split, download, cache_dir)
    stem = f"{dataset}-{split}-{_cache_key(dataset, split, files)[:24]}"
    image_path, label_path = cache_dir / f"{stem}.images.npy", cache_dir / f"{stem}.labels.npy"

    cached = _load_cached(image_path, label_path)
    if cached is not None:
        _check_labels(cached[1], dataset, root)
        return cached
    if kind == "parquet":
        images, labels = _read_parquet(files, _PARQUET_LABEL[dataset])
    else:
        images, labels = _read_pickles(files, _PICKLE_LAYOUT[dataset][3])
    _check_labels(labels, dataset, root)
    try:
        for path, array in ((image_path, images), (label_path, labels)):
            with storage.atomic_file(path) as f:  # other Ray workers racing on the cache see no file or a whole one
                np.save(f, array.numpy())
    except OSError as e:  # e.g. a read-only home on a cluster node: still train, just slower next time
        warnings.warn(f"could not write CIFAR cache under {cache_dir}: {e}", stacklevel=2)
    return images, labels


def _sources(root: str, dataset: str, split: str, download: bool, cache_dir: Path) -> tuple[str, list[str]]:
    """(kind, files) of a split under `root`, downloading it there first if asked and absent."""
    if storage.is_file(root):
        raise DataError(f"data.root {root} is a file: give the folder that holds the dataset's files "
                        f"({storage.parent(root)})")
    found = _find_sources(root, dataset, split)
    if found is None and download:
        _download(root, dataset, split, cache_dir)
        found = _find_sources(root, dataset, split)
    if found is None:
        raise DataNotFoundError(_not_found_message(root, dataset, split))
    return found


def _download(root: str, dataset: str, split: str, cache_dir: Path) -> None:
    """Both splits, in torchvision's pickle layout, with torchvision's downloader (which checks their md5s). It
    writes only to a local dir, so a URI root gets them through a temp dir under the cache (the archive and its
    extracted files, about 360 MB for either dataset; /tmp may be a small RAM disk), and then only the extracted
    folder is uploaded."""
    download_cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    if not storage.is_uri(root):
        download_cls(root, train=split == "train", download=True)
        return
    storage.check_writable(root)  # a bucket that refuses the upload fails now, not after a 170 MB download
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache_dir) as local:
        download_cls(local, train=split == "train", download=True)
        folder = _PICKLE_LAYOUT[dataset][0]
        print(f"uploading {folder} to {root}", flush=True)
        storage.upload_dir(Path(local) / folder, storage.join(root, folder))


def _parquet_patterns(dataset: str, split: str) -> list[str]:
    dirs = _PARQUET_CONFIG_DIRS[dataset]
    return [f"{split}.parquet", f"{split}-*.parquet"] + [f"{d}/{split}-*.parquet" for d in dirs]


def _pickle_files(dataset: str, split: str) -> tuple[str, list[str]]:
    folder, train_files, test_files, _ = _PICKLE_LAYOUT[dataset]
    return folder, train_files if split == "train" else test_files


def _find_sources(root: str, dataset: str, split: str) -> tuple[str, list[str]] | None:
    """(kind, files) of the first source layout present under root, else None."""
    for pattern in _parquet_patterns(dataset, split):
        shards = storage.glob(root, pattern)  # sorted by name = HF shard order
        if shards:
            return "parquet", shards
    folder, names = _pickle_files(dataset, split)
    for directory in (storage.join(root, folder), root):
        files = [storage.join(directory, name) for name in names]
        if all(storage.is_file(f) for f in files):
            return "pickle", files
    return None


def _not_found_message(root: str, dataset: str, split: str) -> str:
    folder, names = _pickle_files(dataset, split)
    listed = names[0] if len(names) == 1 else f"{names[0][:-1]}1..{len(names)}"  # data_batch_1..5
    looked = _parquet_patterns(dataset, split) + [f"{folder}/{listed}", f"{listed} directly in the root"]
    return (
        f"{_NAMES[dataset]} {split} split not found under {root}: looked for {', '.join(looked)}; "
        f"point data.root (or --data) at a directory with the HuggingFace parquet files "
        f"or torchvision's {folder}, or pass --download"
    )


def _cache_key(dataset: str, split: str, files: list[str]) -> str:
    # Location + size + mtime (ns) of every source: a rewritten or touched file changes the key,
    # so a stale decode is never served; hashing the contents would cost as much as decoding.
    stats = []
    for f in files:
        found = storage.info(f)
        stats.append([f, found.size, found.mtime_ns])
    blob = json.dumps([CACHE_FORMAT_VERSION, dataset, split, stats])
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_cached(image_path: Path, label_path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        images, labels = np.load(image_path), np.load(label_path)
    except Exception:  # missing, truncated or garbage: treat as a miss and rebuild
        return None
    if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32) or labels.dtype != np.int64:
        return None
    if labels.shape != images.shape[:1]:
        return None
    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_parquet(files: list[str], label_column: str) -> tuple[torch.Tensor, torch.Tensor]:
    tables = []
    for f in files:
        try:
            tables.append(storage.read_table(f, ["img", label_column]))
        except (pa.ArrowInvalid, OSError) as e:  # not parquet, truncated, or without those columns
            columns = _parquet_columns(f)
            found = f"its columns are {', '.join(columns)}" if columns else str(e).splitlines()[0][:200]
            raise DataError(f"cannot read {f} as CIFAR parquet (columns 'img' and '{label_column}'): {found}; "
                            "use the HuggingFace uoft-cs/cifar10 or cifar100 files, and data.dataset to match") from None
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise DataError(f"{', '.join(str(f) for f in files)} hold no images; point data.root at the full dataset")
    pngs = table.column("img").combine_chunks().field("bytes").to_pylist()
    # PIL, not torchvision.io.decode_png: decode_png is only ~15% faster (~2.9 s vs ~3.3 s for the
    # 50k train PNGs on 2 cores, paid once per cache) but deprecated since torchvision 0.29.
    nhwc = np.stack([_decode_png(png, i, files) for i, png in enumerate(pngs)])
    images = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(table.column(label_column).to_numpy().astype(np.int64))
    return images, labels


def _parquet_columns(location: str) -> list[str]:
    try:
        return storage.read_schema_names(location)
    except (pa.ArrowInvalid, OSError):
        return []


def _decode_png(png: bytes | None, row: int, files: list[str]) -> np.ndarray:
    try:
        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    except (OSError, TypeError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"image {row} of {files[0]} is not a readable PNG ({type(e).__name__}); "
                        "the parquet files are damaged: fetch them again") from None
    if image.shape != (32, 32, 3):
        raise DataError(f"image {row} of {files[0]} is {image.shape[1]}x{image.shape[0]}; CIFAR images are "
                        "32x32: point data.root at CIFAR-10/100")
    return image


# What torchvision's CIFAR batches hold besides builtins: numpy arrays (as numpy 1 and 2 pickle them) and, from
# Python 3 writers, bytes. Nothing else is ever loaded: a pickle may name any callable, and loading runs it.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, location: str):
        super().__init__(io.BytesIO(storage.read_bytes(location)), encoding="bytes")  # Python 2's strings: bytes
        self.location = location

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(f"{self.location} names {module}.{name}, which no CIFAR batch holds: refused, as loading "
                            "it could run code; use the files of torchvision's CIFAR download (or the parquet files)")
        return super().find_class(module, name)


def _read_pickles(files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    data, labels = [], []
    for f in files:
        try:
            batch = _CifarUnpickler(f).load()
            rows = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32)
            batch_labels = list(batch[label_key])
        except DataError:
            raise
        except Exception as e:  # truncated, not a pickle, or not a CIFAR batch: all mean "fetch it again"
            raise DataError(f"cannot read {f} as a CIFAR batch ({type(e).__name__}: {str(e)[:120]}); it is "
                            "truncated or not from torchvision's CIFAR download: fetch it again") from None
        data.append(rows)
        labels.extend(batch_labels)
    # Rows are 3072 bytes in CHW order (1024 red, 1024 green, 1024 blue), i.e. already NCHW.
    images = np.ascontiguousarray(np.concatenate(data).reshape(-1, 3, 32, 32))
    if len(images) != len(labels) or not len(images):
        raise DataError(f"{files[0]}.. hold {len(images)} images and {len(labels)} labels: fetch them again")
    return torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64)


def _check_labels(labels: torch.Tensor, dataset: str, root: str) -> None:
    classes = NUM_CLASSES[dataset]
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"labels under {root} run from {int(labels.min())} to {int(labels.max())}, but "
                        f"{_NAMES[dataset]} has classes 0..{classes - 1}: set data.dataset to match the files")
