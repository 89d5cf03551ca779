"""BatchNorm over the global batch when a run has several workers (pure PyTorch; no Ray).

With per-worker BatchNorm a run normalises over each worker's share of the batch (64 images at 2 workers, 8 at
16) and DDP keeps rank 0's running statistics: the training changes with the worker count. Global BatchNorm makes
every worker normalise with the mean and variance of the whole global batch, and every rank's running statistics
the same. One implementation for CPU (gloo) and CUDA (NCCL), `GlobalBatchNorm2d`: per layer, one all-gather in
forward (each rank's per-channel mean, variance and count, pooled on every rank) and one in backward (the sums of
the gradients: collectives.sum_over_ranks), and nothing is read back to the host. torch's SyncBatchNorm is not used: it
refuses CPU tensors, and on CUDA it costs a host sync per layer (a boolean-mask index) and two blocking collectives
per layer in forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_resnet.core.collectives import gather_from_ranks, sum_over_ranks, world_size
from ray_resnet.core.precision import at_least_fp32


def _pooled(ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count of the global batch, per channel, from each rank's row of [mean per channel,
    variance per channel, count] (float64). Chan et al.'s pairwise formula: each rank's variance plus its mean's
    squared distance to the global mean, weighted by its count, so nothing large is subtracted."""
    channels = (ranks.shape[1] - 1) // 2
    means, variances, counts = ranks[:, :channels], ranks[:, channels:-1], ranks[:, -1:]
    total = counts.sum()
    mean = (means * counts).sum(0) / total
    var = ((variances + (means - mean) ** 2) * counts).sum(0) / total
    return mean, var, total


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch normalisation of this rank's share with the statistics of the whole global batch, forward and backward
    (the math of torch's SyncBatchNorm, whose kernels exist only for GPUs). One collective each way; the work over
    the activations runs in torch's kernels (batch_norm_update_stats, batch_norm, addcmul), so it costs about what a
    local BatchNorm costs."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        # This rank's per-channel mean and biased variance in one pass of torch's own kernel (Welford's, so no
        # E[x^2] - E[x]^2 cancellation; float64 sums of x cost a float64 copy of it, about 25 ms of a 64-image
        # ResNet-20 step on one CPU core), then every rank's [mean, variance, count] row pooled here.
        local_mean, local_var = torch.batch_norm_update_stats(x, None, None, 0.0)
        # a fill on the device, not a tensor from a Python number (a host-to-device copy per layer on CUDA)
        count = x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float64)
        mean, var, total = _pooled(gather_from_ranks(torch.cat([local_mean.double(), local_var.double(), count])))
        invstd = torch.rsqrt(var + eps)
        out = F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), weight, bias, training=False, eps=eps)
        ctx.save_for_backward(x, weight, mean.to(x.dtype), invstd.to(x.dtype), total.to(x.dtype))
        return out, mean, var, total

    @staticmethod
    def backward(ctx, grad_out, *_):
        x, weight, mean, invstd, total = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        sum_dy = grad_out.sum((0, 2, 3))
        sum_dy_xmu = (grad_out * x).sum((0, 2, 3)) - mean * sum_dy
        # This rank's share of the parameter gradients (DDP averages them); the input gradient needs the sums of
        # every rank, since each input moved the global mean and variance.
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy
        sums = torch.cat([sum_dy, sum_dy_xmu])
        sum_over_ranks(sums)
        mean_dy, mean_dy_xmu = (sums / total).chunk(2)
        scale = invstd * (weight if weight is not None else 1)
        # grad_x = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight, per channel as
        # dy * scale + x * slope + offset
        slope = -scale * invstd * invstd * mean_dy_xmu
        offset = -scale * mean_dy - slope * mean
        grad_x = torch.addcmul(offset.view(shape), x, slope.view(shape)).addcmul_(grad_out, scale.view(shape))
        return grad_x, (grad_weight if weight is not None else None), (grad_bias if weight is not None else None), None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are those of the batch over all ranks (same keys and buffers,
    so its state dict is a plain BatchNorm2d's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        out, mean, var, total = _GlobalBatchNorm.apply(at_least_fp32(x), self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # a cumulative average without momentum; a tensor, as float() would wait for the device
                momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out.to(x.dtype)


def use_global_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm2d normalising over the global batch (in place: the modules keep their parameters
    and buffers, on any device)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
    return model

