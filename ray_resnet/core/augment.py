"""Normalisation and batched augmentation on uint8 images (pure PyTorch; no Ray): pad-4 crop, flip and random
erasing drawn per sample for the whole global batch and applied with tensor ops.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ray_resnet.constants import IMAGENET_MEAN, IMAGENET_STD
from ray_resnet.core.batches import Step

# torchvision RandomErasing(scale=..., ratio=...): erased area as a fraction of the image, and
# the height/width aspect range; it tries up to 10 random rectangles per image.
_ERASE_SCALE = (0.02, 1 / 3)
_ERASE_RATIO = (0.3, 3.3)
_ERASE_ATTEMPTS = 10


@functools.cache
def _imagenet_statistics(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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
    mean, std = _imagenet_statistics(images_uint8.device, scaled.dtype)
    return (scaled - mean) / std


def mean_image(images_uint8: torch.Tensor, indices: torch.Tensor, chunk: int = 5000) -> torch.Tensor:
    """The mean of images[indices] per pixel and channel, [3,H,W] on [0,1] in the default float dtype, on the images'
    device.

    Summed in float64 over fixed chunks, so every rank that passes the same indices gets the same bits."""
    total = torch.zeros(images_uint8.shape[1:], dtype=torch.float64, device=images_uint8.device)
    for part in indices.to(images_uint8.device).split(chunk):
        total += images_uint8[part].sum(0, dtype=torch.float64)
    return (total / (255 * max(len(indices), 1))).to(torch.get_default_dtype())


class _GlobalDraws:
    """Random draws made for every row of the global batch, of which this rank keeps its rows."""

    def __init__(self, generator: torch.Generator, total: int, rows: slice):
        self.generator, self.total, self.rows = generator, total, rows
        self.device = generator.device

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand((self.total, *shape), generator=self.generator, device=self.device)[self.rows]

    def integers(self, high: int) -> torch.Tensor:  # [B, 1] in [0, high)
        return torch.randint(0, high, (self.total, 1), generator=self.generator, device=self.device)[self.rows]

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn((self.total, *shape), generator=self.generator, device=self.device)[self.rows]


def augment(images_uint8: torch.Tensor, generator: torch.Generator, pad: int = 4, flip_p: float = 0.5,
            erase_p: float = 0.25, share: Step | None = None, pixel_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample pad+random-crop, horizontal flip, normalize (by `pixel_mean` if given), random erasing; all
    batched.

    uint8 [B,3,H,W] -> float [B,3,H,W] (as `normalize`). ``generator`` must live on the images' device; the
    output is a deterministic function of its state. Erasing follows torchvision's
    RandomErasing(p=erase_p, scale=(0.02, 1/3), ratio=(0.3, 3.3), value="random").

    With ``share`` (a Step) the images are rows ``share.offset`` .. ``+ B`` of a global batch of
    ``share.global_count``: every draw is made for the whole global batch and this slice is kept, so an image
    gets the same crop, flip and erasing whichever rank holds it (and every rank's generator advances alike).
    """
    batch = len(images_uint8)
    total, offset = (share.global_count, share.offset) if share is not None else (batch, 0)
    draws = _GlobalDraws(generator, total, slice(offset, offset + batch))
    out = normalize(_crop_and_flip(images_uint8, draws, pad, flip_p), pixel_mean)
    return _erase(out, draws, erase_p)


def _crop_and_flip(images_uint8: torch.Tensor, draws: _GlobalDraws, pad: int, flip_p: float) -> torch.Tensor:
    # Crop + flip as one gather from the zero-padded batch: output pixel (i, j) of sample b
    # reads padded[b, :, dy_b + i, dx_b + j], with j mirrored (width - 1 - j) when flipped.
    batch, channels, height, width = images_uint8.shape
    device = images_uint8.device
    padded = F.pad(images_uint8, (pad, pad, pad, pad))
    padded_width = width + 2 * pad
    dy, dx = draws.integers(2 * pad + 1), draws.integers(2 * pad + 1)
    flip = draws.uniform(1) < flip_p
    ys, xs = torch.arange(height, device=device), torch.arange(width, device=device)
    rows = ys + dy  # [B, H]
    cols = torch.where(flip, width - 1 - xs, xs) + dx  # [B, W]
    flat_index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
    cropped = padded.flatten(2).gather(2, flat_index.expand(batch, channels, -1))
    return cropped.view(batch, channels, height, width)


def _erase(out: torch.Tensor, draws: _GlobalDraws, erase_p: float) -> torch.Tensor:
    # Random erasing, torchvision's rejection sampling with all attempts drawn at once:
    # area ~ U(scale) x image area (pixels), log aspect ~ U(log ratio); the first attempt whose
    # rectangle fits strictly inside the image is used, none fitting = no erase.
    height, width = out.shape[2:]
    lo, hi = _ERASE_SCALE
    area = height * width * (lo + (hi - lo) * draws.uniform(_ERASE_ATTEMPTS))
    log_lo, log_hi = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws.uniform(_ERASE_ATTEMPTS))
    h = torch.round(torch.sqrt(area * aspect)).long()  # torch.round = Python round (half to even)
    w = torch.round(torch.sqrt(area / aspect)).long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    h, w = h.gather(1, first), w.gather(1, first)  # [B, 1]
    erase = (draws.uniform(1) < erase_p) & fits.any(dim=1, keepdim=True)
    # Integer top/left uniform in [0, height - h] and [0, width - w]; the clamp guards float
    # rounding of u * n up to n.
    top = (draws.uniform(1) * (height - h + 1)).long().clamp(max=height - h)
    left = (draws.uniform(1) * (width - w + 1)).long().clamp(max=width - w)
    ys, xs = torch.arange(height, device=out.device), torch.arange(width, device=out.device)
    in_rows = (ys >= top) & (ys < top + h)  # [B, H]
    in_cols = (xs >= left) & (xs < left + w)  # [B, W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, :, None]).unsqueeze(1)  # [B,1,H,W]
    return torch.where(mask, draws.normal(*out.shape[1:]), out)
