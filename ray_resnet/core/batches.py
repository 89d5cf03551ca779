"""Which images each rank trains and evaluates on (pure PyTorch; no Ray): class-balanced subsets, one epoch's global
batches split across ranks, evaluation shards.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch


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
