"""CIFAR-10/100 loading, caching, sharding and GPU-friendly augmentation.

Pure PyTorch: nothing here knows about Ray, so every piece is testable on a laptop.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets

from .config import cache_dir as resolve_cache_dir
from .constants import DATASETS, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from . import storage
from .errors import DataError, DataNotFoundError

# Bump when the cached array layout changes so old cache files are never read.
CACHE_FORMAT_VERSION = 1

# torchvision RandomErasing(scale=..., ratio=...): erased area as a fraction of the image, and
# the height/width aspect range; it tries up to 10 random rectangles per image.
_ERASE_SCALE = (0.02, 1 / 3)
_ERASE_RATIO = (0.3, 3.3)
_ERASE_ATTEMPTS = 10

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
    HuggingFace parquet, then torchvision's pickle batches, then (``download=True``, local roots) a
    torchvision download. Decoded arrays are cached in ``cache_dir`` (local) keyed by the source
    files' locations, sizes and mtimes.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    root = storage.absolute(root)

    found = _find_sources(root, dataset, split)
    if found is None and download and storage.is_uri(root):
        raise DataNotFoundError(f"{_NAMES[dataset]} is not under {root}, and --download writes only to a local "
                                "dir: download it locally, or copy the parquet files there")
    if found is None and download:
        download_cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
        download_cls(str(root), train=split == "train", download=True)  # writes the pickle layout
        found = _find_sources(root, dataset, split)
    if found is None:
        raise DataNotFoundError(_not_found_message(root, dataset, split))
    kind, files = found

    cache_dir = resolve_cache_dir(cache_dir)
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


def load_test_split(dataset: str, root: str | os.PathLike | None, trained_with: dict,
                    source: str = "the weights") -> tuple[torch.Tensor, torch.Tensor]:
    """The test split to evaluate a model on: under `root`, else where the run that trained it (its config dict
    `trained_with`; {} if unknown) read its data."""
    data = trained_with.get("data", {})
    root = root or data.get("root")
    if not root:
        raise DataNotFoundError(f"{source} does not say where its data is: pass --data DIR "
                                f"(a dir with the {dataset} parquet files or torchvision's pickles)")
    return load_cifar(root, "test", dataset, False, data.get("cache_dir"))


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


def _read_pickles(files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    data, labels = [], []
    for f in files:
        try:
            batch = pickle.loads(storage.read_bytes(f), encoding="bytes")  # the official files are Python 2 pickles
            rows = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32)
            batch_labels = list(batch[label_key])
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


def _seed_from(*values: int) -> int:
    """A 63-bit generator seed that differs for every distinct tuple (seed, epoch, ...)."""
    digest = hashlib.sha256(repr(values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Step(NamedTuple):
    """One training step of one rank: its share of the global batch, and where that share sits in it."""

    indices: torch.Tensor  # this rank's sample indices
    global_count: int  # images in the global batch, over all ranks
    offset: int  # position of this rank's first image in the global batch


def epoch_batches(
    num_samples: int,
    global_batch: int,
    world_size: int,
    rank: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
) -> list[Step]:
    """This rank's training steps for one epoch.

    One permutation (the same on every rank, keyed on seed and epoch) is cut into global batches of
    ``global_batch`` samples; each is split across ranks in order, with sizes differing by at most one. Every
    rank gets the same number of steps and every index appears exactly once across ranks, so at any worker count
    a step trains on the same images. The caller scales the loss by local_size / global_count so DDP's gradient
    average is the exact global-batch mean even when local sizes differ.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_samples < world_size:
        raise ValueError(
            f"num_samples ({num_samples}) < world_size ({world_size}): some worker would get no data; "
            f"use fewer workers or more samples"
        )
    if global_batch < world_size:
        raise ValueError(f"global_batch ({global_batch}) must be >= world_size ({world_size})")

    if shuffle:
        generator = torch.Generator().manual_seed(_seed_from(seed, epoch))
        order = torch.randperm(num_samples, generator=generator)
    else:
        order = torch.arange(num_samples)
    starts = list(range(0, num_samples, global_batch))
    # A tail smaller than world_size would leave some rank an empty step: merge it into the
    # previous batch (there is one, since num_samples >= world_size).
    if num_samples - starts[-1] < world_size:
        starts.pop()
    bounds = starts + [num_samples]
    steps = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shares = torch.tensor_split(order[lo:hi], world_size)
        steps.append(Step(shares[rank], hi - lo, sum(len(s) for s in shares[:rank])))
    return steps


def eval_shard(num_samples: int, world_size: int, rank: int) -> torch.Tensor:
    """Rank's contiguous slice of range(num_samples); sizes differ by at most one, no padding."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return torch.tensor_split(torch.arange(num_samples), world_size)[rank]


def take_subset(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced random subset of ``n`` samples (deterministic in seed).

    Each class present in ``labels`` gets n // num_classes samples, the first n % num_classes
    classes one more. n None or >= len(labels) returns every index.
    """
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)  # sorted ascending
    per_class, extra = divmod(n, len(classes))
    picks = []
    for i, c in enumerate(classes):
        members = (labels == c).nonzero().flatten()
        take = per_class + (1 if i < extra else 0)
        picks.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(picks).sort().values


@functools.cache
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: torch.tensor(list, device="cuda") copies from host memory, a host sync per call.
    return tuple(torch.tensor(v, device=device, dtype=dtype).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalize(images_uint8: torch.Tensor, pixel_mean: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B,3,H,W] (any device) -> torch's default float dtype (float32 unless a caller changed it) scaled to
    [0,1], then minus `pixel_mean` (a mean image [3,H,W] on that scale, from `mean_image`) or, without one,
    standardised by IMAGENET_MEAN/STD."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    scaled = images_uint8.to(torch.get_default_dtype()) / 255
    if pixel_mean is not None:
        return scaled - pixel_mean
    mean, std = _mean_std(images_uint8.device, scaled.dtype)
    return (scaled - mean) / std


def mean_image(images_uint8: torch.Tensor, indices: torch.Tensor, chunk: int = 5000) -> torch.Tensor:
    """The mean of images[indices] per pixel and channel, [3,H,W] on [0,1] in the default float dtype, on the images'
    device.

    Summed in float64 over fixed chunks, so every rank that passes the same indices gets the same bits."""
    total = torch.zeros(images_uint8.shape[1:], dtype=torch.float64, device=images_uint8.device)
    for part in indices.to(images_uint8.device).split(chunk):
        total += images_uint8[part].sum(0, dtype=torch.float64)
    return (total / (255 * max(len(indices), 1))).to(torch.get_default_dtype())


def augment(
    images_uint8: torch.Tensor,
    generator: torch.Generator,
    pad: int = 4,
    flip_p: float = 0.5,
    erase_p: float = 0.25,
    global_count: int | None = None,
    offset: int = 0,
    pixel_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample pad+random-crop, horizontal flip, normalize (by `pixel_mean` if given), random erasing; all
    batched.

    uint8 [B,3,H,W] -> float [B,3,H,W] (as `normalize`). ``generator`` must live on the images' device; the
    output is a deterministic function of its state. Erasing follows torchvision's
    RandomErasing(p=erase_p, scale=(0.02, 1/3), ratio=(0.3, 3.3), value="random").

    With ``global_count`` the images are rows ``offset`` .. ``offset + B`` of a global batch of
    that many: every draw is made for the whole global batch and this slice is kept, so an image
    gets the same crop, flip and erasing whichever rank holds it (and every rank's generator
    advances alike).
    """
    batch, channels, height, width = images_uint8.shape
    device = images_uint8.device
    total, share = global_count or batch, slice(offset, offset + batch)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand((total, *shape), generator=generator, device=device)[share]

    # Crop + flip as one gather from the zero-padded batch: output pixel (i, j) of sample b
    # reads padded[b, :, dy_b + i, dx_b + j], with j mirrored (width - 1 - j) when flipped.
    padded = F.pad(images_uint8, (pad, pad, pad, pad))
    padded_width = width + 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (total, 1), generator=generator, device=device)[share]
    dx = torch.randint(0, 2 * pad + 1, (total, 1), generator=generator, device=device)[share]
    flip = uniform(1) < flip_p
    ys, xs = torch.arange(height, device=device), torch.arange(width, device=device)
    rows = ys + dy  # [B, H]
    cols = torch.where(flip, width - 1 - xs, xs) + dx  # [B, W]
    flat_index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
    cropped = padded.flatten(2).gather(2, flat_index.expand(batch, channels, -1))
    out = normalize(cropped.view(batch, channels, height, width), pixel_mean)

    # Random erasing, torchvision's rejection sampling with all attempts drawn at once:
    # area ~ U(scale) x image area (pixels), log aspect ~ U(log ratio); the first attempt whose
    # rectangle fits strictly inside the image is used, none fitting = no erase.
    lo, hi = _ERASE_SCALE
    area = height * width * (lo + (hi - lo) * uniform(_ERASE_ATTEMPTS))
    log_lo, log_hi = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform(_ERASE_ATTEMPTS))
    h = torch.round(torch.sqrt(area * aspect)).long()  # torch.round = Python round (half to even)
    w = torch.round(torch.sqrt(area / aspect)).long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    h, w = h.gather(1, first), w.gather(1, first)  # [B, 1]
    erase = (uniform(1) < erase_p) & fits.any(dim=1, keepdim=True)
    # Integer top/left uniform in [0, height - h] and [0, width - w]; the clamp guards float
    # rounding of u * n up to n.
    top = (uniform(1) * (height - h + 1)).long().clamp(max=height - h)
    left = (uniform(1) * (width - w + 1)).long().clamp(max=width - w)
    in_rows = (ys >= top) & (ys < top + h)  # [B, H]
    in_cols = (xs >= left) & (xs < left + w)  # [B, W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, :, None]).unsqueeze(1)  # [B,1,H,W]
    noise = torch.randn((total, *out.shape[1:]), generator=generator, device=device)[share]
    return torch.where(mask, noise, out)
