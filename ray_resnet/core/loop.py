"""The training loop (pure PyTorch, no Ray): the epochs of one run on one worker of a group of `world` workers.

`fit` owns the epochs: train, evaluate, best tracking and the NaN stop. What happens around them (checkpoint
files, TensorBoard, reporting to Ray Train) is the caller's, through `Hooks`. Without torch.distributed and
with the default hooks it is a plain single-process training run (tests and bench/ use it that way).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ray_resnet.config import Config, to_dict
from ray_resnet.constants import NUM_CLASSES
from ray_resnet.core.augment import mean_image
from ray_resnet.core.batches import epoch_batches, eval_shard, take_subset
from ray_resnet.core.batchnorm import use_global_batchnorm
from ray_resnet.core.checkpoint import CheckpointState, Progress
from ray_resnet.core.collectives import broadcast_from_first_rank
from ray_resnet.core.models import build_model
from ray_resnet.core.precision import training_precision
from ray_resnet.core.steps import (
    LabeledImages,
    StepSettings,
    Training,
    compile_model,
    compiles,
    evaluate,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)


@dataclass
class Splits:
    """The decoded dataset (uint8 images [N,3,32,32] and int64 labels, on the device that indexes them) and which of
    its samples a run trains and tests on. The arrays are shared (read-only), never copied for a subset."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_index: torch.Tensor  # sorted indices into train_*: data.train_subset, or all (but the val split)
    test_index: torch.Tensor
    val_index: torch.Tensor | None = None  # sorted indices into train_*, disjoint from train_index; None: no split
    pixel_mean: torch.Tensor | None = None  # data.normalize pixel_mean: the mean image of train_index's images


def select_splits(cfg: Config, arrays: dict[str, torch.Tensor]) -> Splits:
    """`arrays` ({train,test}_{images,labels}, as data.load_cifar gives them) with the run's subsets chosen.

    The val split is drawn from the whole training set first, so it is the same with or without data.train_subset,
    which then picks from the rest. Everything depends on the seed only: every rank chooses the same."""
    labels = arrays["train_labels"].cpu()  # indices live on the CPU, as epoch_batches' do
    val_index, pool = None, torch.arange(len(labels))
    if cfg.data.val_split is not None:
        val_index = take_subset(labels, cfg.data.val_split, cfg.seed)
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[val_index] = False
        pool = pool[keep]
    train_index = pool[take_subset(labels[pool], cfg.data.train_subset, cfg.seed)]
    pixel_mean = mean_image(arrays["train_images"], train_index) if cfg.data.normalize == "pixel_mean" else None
    return Splits(**arrays, train_index=train_index, val_index=val_index, pixel_mean=pixel_mean,
                  test_index=take_subset(arrays["test_labels"], cfg.data.test_subset, cfg.seed))


def selection_metric(cfg: Config) -> str:
    """The epoch metric best/ follows: validation accuracy with a val split, else test accuracy."""
    return "val_acc" if cfg.data.val_split is not None else "test_acc"


class Hooks:
    """What the caller does at the loop's events, on every rank. These defaults do nothing."""

    def step_end(self, step: int, images: int, loss: torch.Tensor, lr: float) -> None:
        """After every optimizer step: the run's step count so far (1-based, over epochs), the global batch, this
        rank's mean loss of its share (a device tensor: reading it syncs the host) and the step's lr."""

    def checkpoint_due(self, state: Callable[[], CheckpointState], *, best: bool) -> None:
        """After an epoch the run checkpoints (see CheckpointSchedule; always the last); `best` when the best epoch
        (on validation accuracy; without a val split, test accuracy) changed since the previous checkpoint, so
        best/ always holds the best epoch of the latest checkpoint. `state()` builds the checkpoint's contents."""

    def epoch_end(self, metrics: dict) -> None:
        """After every epoch (after checkpoint_due): its metrics, the same on every rank."""


class CheckpointSchedule:
    """When fit takes a latest checkpoint: after `every_epochs` epochs or `every_s` seconds (by rank 0's `clock`)
    since the previous one, whichever comes first, and after the run's last epoch (`last_epoch`). The attempt's
    start counts as a checkpoint: it resumed from one. Rank 0's clock decides for every rank (a broadcast, only
    where time counts), so all ranks write and report the same checkpoints."""

    def __init__(self, every_epochs: int | None, every_s: float | None, start_epoch: int, last_epoch: int,
                 clock: Callable[[], float] = time.monotonic):
        self.every_epochs, self.every_s, self.last_epoch, self.clock = every_epochs, every_s, last_epoch, clock
        self.since = (start_epoch, clock())  # (epoch, time) of the previous checkpoint

    @classmethod
    def of(cls, cfg: Config, start_epoch: int) -> CheckpointSchedule:
        minutes = cfg.run.checkpoint_every_min
        every = cfg.run.checkpoint_every or (None if minutes else 1)  # neither set: every epoch
        return cls(every, minutes * 60 if minutes else None, start_epoch, cfg.schedule.epochs)

    def due(self, epoch: int, device: torch.device = torch.device("cpu")) -> bool:
        """Whether epoch `epoch` (1-based, just finished) is checkpointed; the same answer on every rank."""
        now = self.clock()
        due = epoch >= self.last_epoch or (self.every_epochs is not None and
                                           epoch - self.since[0] >= self.every_epochs)
        if self.every_s is not None and not due:
            flag = torch.tensor([float(now - self.since[1] >= self.every_s)], device=device)
            broadcast_from_first_rank([flag])
            due = bool(flag.item())
        if due:
            self.since = (epoch, now)
        return due


@dataclass
class Diverged:
    """fit's result when the training loss became NaN/inf: no restart can fix that, so the run stops."""

    loss: float
    epoch: int


def build_training(cfg: Config, device: torch.device, steps_per_epoch: int, world: int = 1,
                   wrap: Callable[..., nn.Module] = lambda model, **ddp: model) -> Training:
    """The seeded model on `device` (channels_last if asked; BatchNorm over the global batch when `world` > 1 and
    cfg.batchnorm is "global"), wrapped by `wrap(model, **DDP keyword arguments)` (e.g. for DDP), compiled where
    perf.compile says (steps.compiles).
    """
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    core = build_model(cfg.model, NUM_CLASSES[cfg.data.dataset]).to(device)
    global_bn = world > 1 and cfg.batchnorm == "global"
    if global_bn:
        core = use_global_batchnorm(core)
    if cfg.perf.channels_last:
        core = core.to(memory_format=torch.channels_last)
    # Global BN keeps every rank's statistics equal: DDP's broadcast of the buffers before every step is not needed.
    wrapped = wrap(core, broadcast_buffers=not global_bn)
    optimizer = make_optimizer(wrapped, cfg.optim)
    compiled = compiles(cfg.perf.compile, device, world, training_precision(device, cfg.perf.amp),
                        steps_per_epoch * cfg.schedule.epochs)
    return Training(model=compile_model(wrapped, device, compiled, cfg.perf.cuda_graphs), optimizer=optimizer,
                    scheduler=make_scheduler(optimizer, cfg.optim.lr, cfg.schedule, steps_per_epoch), core=core,
                    compiled=compiled)


def steps_per_epoch(cfg: Config, num_train: int, world: int) -> int:
    return len(epoch_batches(num_train, cfg.optim.batch_size, world, 0, 0, cfg.seed))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Augmentation randomness depends only on (seed, epoch), never on the rank or the worker count: every rank
    draws the whole global batch's parameters and keeps its share; a resumed run draws what it would have."""
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def run_epoch(cfg: Config, training: Training, data: Splits, epoch: int, rank: int, world: int,
              hooks: Sequence[Hooks] = ()) -> dict:
    """Train epoch `epoch` (0-based) and evaluate the result: the epoch's metrics, summed over the ranks."""
    start = time.perf_counter()
    steps = [step._replace(indices=data.train_index[step.indices]) for step in
             epoch_batches(len(data.train_index), cfg.optim.batch_size, world, rank, epoch, cfg.seed)]
    first = epoch * len(steps) + 1

    def step_end(i: int, images: int, loss: torch.Tensor, lr: float) -> None:
        for hook in hooks:
            hook.step_end(first + i, images, loss, lr)
    settings, train_set = StepSettings.of(cfg, data.pixel_mean), LabeledImages(data.train_images, data.train_labels)
    # augmentation runs where the images go: the model's device (data may stay on the CPU beside a CUDA model)
    generator = epoch_generator(cfg.seed, epoch, next(training.core.parameters()).device)
    train = train_one_epoch(training, train_set, steps, generator, settings, on_step=step_end)
    # Evaluate rank 0's BN statistics everywhere (with per-worker BN they differ): the checkpoint's.
    broadcast_from_first_rank(list(training.core.buffers()))

    def evaluate_on(images: LabeledImages, index: torch.Tensor) -> dict:  # sharded over ranks
        return evaluate(training.core, images, index[eval_shard(len(index), world, rank)],
                        batch_size=cfg.perf.eval_batch_size, settings=settings)
    val = {}
    if data.val_index is not None:
        scores = evaluate_on(train_set, data.val_index)
        val = {"val_loss": scores["loss"], "val_acc": scores["acc"]}
    test = evaluate_on(LabeledImages(data.test_images, data.test_labels), data.test_index)
    return {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"], **val,
            "test_loss": test["loss"], "test_acc": test["acc"], "lr": train["lr"],
            "train_images_per_s": train["images_per_s"], "test_images_per_s": test["images_per_s"],
            "epoch_time_s": time.perf_counter() - start}


def fit(cfg: Config, training: Training, data: Splits, *, rank: int = 0, world: int = 1,
        progress: Progress | None = None, hooks: Sequence[Hooks] = ()) -> Diverged | None:
    """Train from `progress` (a resumed run's; default: the start) to cfg.schedule.epochs.

    Returns Diverged if the loss became NaN/inf. Every rank sees the same all-reduced loss, so all stop together.
    """
    progress = progress or Progress()
    config, select = to_dict(cfg), selection_metric(cfg)
    schedule, best_saved = CheckpointSchedule.of(cfg, progress.epoch), progress.best_epoch  # best/ agrees on resume
    device = next(training.core.parameters()).device  # where a collective's tensor lives (NCCL: the GPU)
    for epoch in range(progress.epoch, cfg.schedule.epochs):
        metrics = run_epoch(cfg, training, data, epoch, rank, world, hooks)
        if not math.isfinite(metrics["train_loss"]):
            return Diverged(metrics["train_loss"], metrics["epoch"])
        # The first epoch is best whatever its score (0 % included), so a run dir always has a best/ to evaluate.
        is_best = progress.best_epoch == 0 or metrics[select] > progress.best_score(select)
        progress.epoch = metrics["epoch"]
        if is_best:
            progress.new_best(training.core, metrics)
        # best_test_acc: the test accuracy of best/'s epoch (the highest one when best/ is selected on the test set)
        metrics.update(best_epoch=progress.best_epoch, best_test_acc=progress.best_test_acc,
                       **({"best_val_acc": progress.best_val_acc} if select == "val_acc" else {}))
        if schedule.due(progress.epoch, device):
            def state() -> CheckpointState:  # built only where a hook saves it
                return CheckpointState.of_training(training, progress, config, metrics, data.pixel_mean)

            for hook in hooks:
                hook.checkpoint_due(state, best=progress.best_epoch != best_saved)
            best_saved = progress.best_epoch
        for hook in hooks:
            hook.epoch_end(metrics)
    return None
