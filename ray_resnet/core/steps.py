"""The steps (pure PyTorch; no Ray): a training epoch, an evaluation pass, the optimizer and the lr schedule.

Both epoch functions return plain metric dicts. Under torch.distributed they sum their counters over all ranks,
so every rank returns the same global numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ray_resnet.config import Config, OptimConfig, ScheduleConfig
from ray_resnet.core.augment import augment, normalize
from ray_resnet.core.batches import Step
from ray_resnet.core.collectives import global_sums, world_size
from ray_resnet.core.precision import at_least_fp32, autocast, native_bf16


def lr_at(epoch: float, base_lr: float, schedule: ScheduleConfig) -> float:
    """Learning rate at a (fractional) epoch: warmup from warmup_start_lr (linear, or constant), then step decay."""
    if epoch < schedule.warmup_epochs:
        if schedule.warmup == "constant":
            return schedule.warmup_start_lr
        return schedule.warmup_start_lr + (base_lr - schedule.warmup_start_lr) * epoch / schedule.warmup_epochs
    return base_lr * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    # Weight decay on every parameter, BN included, as in the paper and the reference reproductions.
    return torch.optim.SGD(
        model.parameters(), lr=optim.lr, momentum=optim.momentum,
        weight_decay=optim.weight_decay, nesterov=optim.nesterov,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, base_lr: float, schedule: ScheduleConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration, so warmup is smooth and milestones land on epoch boundaries."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step / steps_per_epoch, base_lr, schedule) / base_lr
    )


# torch.compile on CPU, measured side by side with eager (bench/COMPILE.md; 2 cores, steady img/s compiled / eager):
# it pays with bf16 on AMX (Intel Xeon, ResNet-20: 1.14x after a 35 s compile, won back in 2,300 steps). In fp32
# (AMD EPYC, ResNet-20 and -56, 1 worker and 2 DDP workers with global BatchNorm) compiled and eager differed by
# 0.93-1.09x over two runs, within that shared machine's noise, and each compile took 32-101 s: eager there. auto
# compiles on CPU for runs of at least this many steps, twice the measured break-even, as deeper nets and several
# workers per node take longer to compile (one compile per worker process, sharing the cores).
CPU_COMPILE_MIN_STEPS = 5000


def compiles(compile: str, device: torch.device, world: int = 1, precision: str = "fp32",
             total_steps: int = 0) -> bool:
    """Whether the training step is compiled: "on"; "auto" on one CUDA worker, or on CPU where measured to pay
    (bf16 on a CPU with AMX, for a run of CPU_COMPILE_MIN_STEPS steps or more)."""
    if compile != "auto":
        return compile == "on"
    if device.type == "cuda":
        return world == 1  # compile + DDP + global BatchNorm has not run on GPUs yet (the driver refuses "on")
    return (device.type == "cpu" and precision == "bf16" and native_bf16(device)
            and total_steps >= CPU_COMPILE_MIN_STEPS)


def compile_model(model: nn.Module, device: torch.device, compiled: bool, cuda_graphs: bool = False) -> nn.Module:
    """`model` under torch.compile if `compiled` (see `compiles`), else `model` itself.

    Compiled for static shapes: an epoch's tail batch (80 images of 50,000 at batch 128) gets a graph of its own,
    compiled once, instead of recompiling every step's graph for a dynamic batch size. The compiled wrapper shares
    parameters and buffers with `model`: checkpoint and evaluate the eager module.
    """
    if not compiled:
        return model
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if cuda_graphs and device.type == "cuda" else None)


def _indices_on(device: torch.device, batches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The batches' index tensors on `device` with one copy: a copy per step from pageable CPU memory
    would make the host wait for the GPU at every step."""
    return torch.cat(list(batches)).to(device).split([len(b) for b in batches])


class LabeledImages(NamedTuple):
    images: torch.Tensor  # uint8 [N,3,32,32], on any device
    labels: torch.Tensor  # int64 [N]


@dataclass(frozen=True)
class StepSettings:
    """How a step treats its images: the recipe's label smoothing and erasing, the layout and the training
    precision (perf.amp), and the normalisation (a pixel_mean run's mean image, else ImageNet's statistics)."""

    label_smoothing: float = 0.1
    erase_p: float = 0.25
    channels_last: bool = True
    amp: str = "auto"
    pixel_mean: torch.Tensor | None = None

    @classmethod
    def of(cls, cfg: Config, pixel_mean: torch.Tensor | None = None) -> StepSettings:
        return cls(label_smoothing=cfg.optim.label_smoothing, erase_p=cfg.data.erase_p,
                   channels_last=cfg.perf.channels_last, amp=cfg.perf.amp, pixel_mean=pixel_mean)

    def prepare(self, images_u8: torch.Tensor, device: torch.device, step: Step | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised images on `device`; augmented as rows of `step`'s global batch when training."""
        x = images_u8.to(device, non_blocking=True)
        x = normalize(x, self.pixel_mean) if step is None else augment(
            x, generator, erase_p=self.erase_p, share=step, pixel_mean=self.pixel_mean)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class Training:
    """What a worker trains: torchvision's `model` / `model_without_ddp` pair, its optimizer and lr schedule."""

    model: nn.Module  # takes the training steps: `core`, wrapped (DDP) and possibly compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    core: nn.Module | None = None  # the module itself, evaluated and checkpointed (default: `model`)
    compiled: bool = False  # `model` is under torch.compile: its first step compiles it

    def __post_init__(self):
        self.core = self.core if self.core is not None else self.model

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.core.parameters())


class EpochMeter:
    """Loss, correct predictions and images of an epoch (training or evaluation), summed on the device (no host
    sync per step) and over all ranks once at the end, so every rank gets the same global numbers."""

    def __init__(self, device: torch.device):
        self.device, self.start = device, time.perf_counter()
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss_sum.detach()
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def result(self) -> dict[str, float]:
        """loss (mean per image), acc (%), images_per_s, count and time_s (seconds) over all ranks."""
        loss, correct, seen = global_sums([self.loss_sum, self.correct, self.seen], self.device)
        elapsed = time.perf_counter() - self.start
        return {"loss": loss / max(seen, 1), "acc": 100.0 * correct / max(seen, 1), "images_per_s": seen / elapsed,
                "count": int(seen), "time_s": elapsed}


def train_one_epoch(training: Training, data: LabeledImages, steps: Sequence[Step], generator: torch.Generator,
                    settings: StepSettings = StepSettings(),
                    on_step: Callable[[int, int, torch.Tensor, float], None] | None = None) -> dict[str, float]:
    """One pass over `steps` (from batches.epoch_batches). Every rank passes a generator in the same state (data
    order and augmentation depend on the global batch, not the rank).

    Each rank's loss is its sum over samples divided by the global batch size and multiplied by the world size,
    so DDP's gradient average is the exact mean over the global batch even when ranks hold unequal shares.
    `on_step(i, global_batch, loss, lr)` runs after step i (0-based) with this rank's mean loss of the batch as a
    device tensor (reading it syncs the host) and the step's lr. Returns EpochMeter's metrics and the lr of the
    epoch's last step.
    """
    model, optimizer = training.model, training.optimizer
    device, ranks = next(model.parameters()).device, world_size()
    model.train()
    meter, lr = EpochMeter(device), optimizer.param_groups[0]["lr"]
    for i, (idx, step) in enumerate(zip(_indices_on(data.images.device, [step.indices for step in steps]), steps)):
        x = settings.prepare(data.images[idx], device, step, generator)
        y = data.labels[idx].to(device, non_blocking=True)
        with autocast(device, settings.amp):
            logits = model(x)
        batch_loss = F.cross_entropy(at_least_fp32(logits), y, label_smoothing=settings.label_smoothing,
                                     reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        (batch_loss * (ranks / step.global_count)).backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        training.scheduler.step()
        meter.add(batch_loss, logits, y)
        if on_step:
            on_step(i, step.global_count, batch_loss.detach() / len(idx), lr)
    return {**meter.result(), "lr": lr}


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledImages, indices: torch.Tensor | None = None, *, batch_size: int = 500,
             settings: StepSettings = StepSettings(), precision: str = "fp32") -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over `indices` (this rank's shard; default all), summed over ranks,
    with `settings`' layout and normalisation.

    The loss has no label smoothing, so it is comparable across recipes. Runs and `ray-resnet eval` evaluate in fp32
    whatever perf.amp says (`precision` is for bench.precision): bf16 moved the published ResNet-20/56 weights' test
    accuracy by 0.03/0.05 points (measured on an AMX Xeon), and evaluation is under a tenth of an epoch's time, so
    reported accuracies do not depend on the hardware's precision.
    """
    device = next(model.parameters()).device
    model.eval()
    indices = torch.arange(len(data.labels)) if indices is None else indices
    meter = EpochMeter(device)
    for chunk in _indices_on(data.images.device, indices.split(batch_size)):
        x = settings.prepare(data.images[chunk], device)
        y = data.labels[chunk].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        meter.add(F.cross_entropy(at_least_fp32(logits), y, reduction="sum"), logits, y)
    return meter.result()
