"""BatchNorm over the global batch when a run has several workers (pure PyTorch; no Ray).

With per-worker BatchNorm a run normalises over each worker's share of the batch (64 images at 2 workers, 8 at
16) and DDP keeps rank 0's running statistics: the training changes with the worker count. Global BatchNorm makes
every worker normalise with the mean and variance of the whole global batch, and every rank's running statistics
the same. On CUDA it is torch's SyncBatchNorm; torch's refuses CPU tensors, so on CPU (gloo) it is
`GlobalBatchNorm2d`: the per-channel sums are all-reduced once in forward and once (their gradient) in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are those of the batch over all ranks (same keys and buffers,
    so its state dict is a plain BatchNorm2d's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        local = x.float()
        count = torch.full((1,), float(local.numel() // local.shape[1]), device=x.device, dtype=torch.float64)
        # one all-reduce of [sum, sum of squares, count] per layer; float64 so E[x^2] - E[x]^2 does not cancel
        stats = torch.cat([local.sum((0, 2, 3)).double(), (local * local).sum((0, 2, 3)).double(), count])
        stats = _SumOverRanks.apply(stats)
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        out = (local - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def use_global_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm2d normalising over the global batch: torch's SyncBatchNorm on CUDA, else
    GlobalBatchNorm2d (in place: the modules keep their parameters and buffers)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
    return model

