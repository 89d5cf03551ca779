"""A worker's share of a GPU (pure PyTorch; no Ray): sweep trials that share one GPU (run.gpus_per_worker < 1)
each keep to their share of its memory.
"""

from __future__ import annotations

import torch


def cap_gpu_memory(fraction: float, device: torch.device) -> float | None:
    """Limit this process's CUDA caching allocator on `device` to `fraction` of the GPU's memory when it has only a
    share of the GPU (0 < fraction < 1): a trial that needs more (ResNet-1202 at a quarter of a 24 GB card) then
    fails with its own out-of-memory error instead of taking memory its neighbours were counting on. Call it before
    anything is allocated on the GPU. The CUDA context (a few hundred MB per process) lies outside the cap.

    Returns the fraction set, or None where there is nothing to cap (a CPU device, or a whole GPU or more)."""
    if not fraction > 0:
        raise ValueError(f"a worker's GPU share must be > 0, got {fraction!r}: set run.gpus_per_worker to e.g. 0.25")
    if device.type != "cuda" or fraction >= 1:
        return None
    torch.cuda.set_per_process_memory_fraction(float(fraction), device)
    return float(fraction)
