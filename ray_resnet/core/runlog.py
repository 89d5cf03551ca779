"""Rank 0's record of a run (pure): console lines, and TensorBoard events in <run dir>/tb.

Per epoch: one console line, and scalars under the tags of `constants.TB_TAGS` with the epoch as step; at the end
an HParams entry (the run's model, depth, seed, lr, ... against its final and best test accuracy). `report` reads
the same tags back. Per optimizer step: every `run.log_every_steps` steps the training loss (mean over those steps)
and the lr under `constants.STEP_TAGS`, with the run's step count as step, in tb/steps (a TensorBoard run of its
own, see RunLog); and during long epochs a progress line (steps done, images/s, the epoch's ETA) every few seconds.
When the run dir is a URI, the events are written to a local directory and mirrored to <run dir>/tb (the files
that grew since the previous mirror): after every checkpointed epoch, before its checkpoint is reported, so every
epoch a resume will not train again has its events in storage; else at most every MIRROR_EVERY_S (checked at
every logged step and epoch end); and at the end. A killed run may lose the events of epochs after its latest
checkpoint, which the resumed attempt trains and logs again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

import torch

from ray_resnet.config import Config
from ray_resnet.constants import STEP_TAGS, TB_DIR_STEPS, TB_TAGS, parse_model_name
from ray_resnet.core.loop import Hooks
from ray_resnet.io import storage
from ray_resnet.io.tracking import MetricLog

# Seconds between progress lines: Ray workers' stdout is never a terminal, so the driver says which it writes to.
# A terminal gets one every few seconds; a file or a Ray job log, whose lines stay forever, one a minute.
PROGRESS_EVERY_S = {"terminal": 5.0, "file": 60.0}
FIRST_PROGRESS_S = 30.0  # the attempt's first line comes at most this long after its first step
# URI run dirs: events reach storage at most this long (seconds) after they were logged, plus a step interval or
# an epoch. Each mirror is a PUT per grown file (2 or 3): after every 1-2 s GPU epoch that would add up.
MIRROR_EVERY_S = 60.0


def progress_every_s(is_terminal: bool) -> float:
    return PROGRESS_EVERY_S["terminal" if is_terminal else "file"]


def hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def epoch_line(metrics: dict, epochs: int) -> str:
    done = metrics["epoch"]
    val = f"val acc {metrics['val_acc']:5.2f}%  " if "val_acc" in metrics else ""
    return (f"epoch {done:>3}/{epochs}  train loss {metrics['train_loss']:.3f} acc {metrics['train_acc']:5.2f}%  "
            f"{val}test loss {metrics['test_loss']:.3f} acc {metrics['test_acc']:5.2f}%  lr {metrics['lr']:.4g}  "
            f"{metrics['train_images_per_s']:,.0f} img/s  {metrics['epoch_time_s']:.0f}s  "
            f"ETA {hms(metrics['epoch_time_s'] * (epochs - done))}")


class ProgressLines:
    """When rank 0 prints a line inside an epoch: `every_s` seconds after the previous line (progress or epoch
    line), the attempt's first one at most FIRST_PROGRESS_S after its first step. Speed and ETA are measured from
    the end of the epoch's first step, which carries one-time costs (allocation, compilation)."""

    def __init__(self, every_s: float, steps_per_epoch: int, epochs: int, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.steps_per_epoch, self.epochs, self.clock = every_s, steps_per_epoch, epochs, clock
        self.wait_s = min(every_s, FIRST_PROGRESS_S)
        self.quiet_since: float | None = None  # time of the latest line, or of the attempt's first step
        self.epoch = 0  # the epoch (1-based) of epoch_start
        self.epoch_start = (0.0, 0)  # (time, step within the epoch) of the end of the epoch's first step
        self.images = 0  # trained since epoch_start

    def step(self, step: int, images: int, loss: float | None = None) -> str | None:
        """After the run's step `step` (1-based, over epochs) of `images` images: the line to print, if one is due
        (with `loss`, the latest logged training loss, if there is one)."""
        now = self.clock()
        epoch, done = (step - 1) // self.steps_per_epoch + 1, (step - 1) % self.steps_per_epoch + 1
        if self.quiet_since is None:
            self.quiet_since = now
        if epoch != self.epoch:
            self.epoch, self.epoch_start, self.images = epoch, (now, done), 0
            return None
        self.images += images
        if now - self.quiet_since < self.wait_s or done == self.steps_per_epoch:
            return None  # (after the last step the epoch line follows)
        self.quiet_since, self.wait_s = now, self.every_s
        elapsed, steps = now - self.epoch_start[0], done - self.epoch_start[1]
        shown_loss = f"  loss {loss:.3f}" if loss is not None else ""
        return (f"epoch {epoch:>3}/{self.epochs}  step {done}/{self.steps_per_epoch}{shown_loss}  "
                f"{self.images / elapsed:,.0f} img/s  epoch ETA {hms(elapsed / steps * (self.steps_per_epoch - done))}")

    def epoch_done(self) -> None:
        self.quiet_since = self.clock()


class CompileNote(Hooks):
    """Rank 0's lines around a compiled model's first step, which runs torch.compile (30-100 s on 2 CPU cores, a few
    seconds with inductor's cache warm): said before, so a quiet start is not taken for a hang, and timed after."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        print("torch.compile: compiling the training step in the first step (perf.compile)", flush=True)
        self.clock, self.start, self.said = clock, clock(), False

    def step_end(self, step: int, images: int, loss: torch.Tensor, lr: float) -> None:
        if not self.said:
            print(f"torch.compile: first step done in {self.clock() - self.start:.1f} s, compilation included",
                  flush=True)
            self.said = True


class RunLog(Hooks):
    """The console and TensorBoard side of one run attempt, which starts after `start_epoch` finished epochs.

    The step-axis scalars live in tb/steps, a TensorBoard run of their own: `purge_step`, which hides what a
    crashed attempt logged after the checkpoint this one resumes from, applies to every tag of an event directory,
    and the epoch tags and the step tags count in different units.
    """

    def __init__(self, tb_dir: str, cfg: Config, start_epoch: int, steps_per_epoch: int, progress_every_s: float,
                 mlflow: MetricLog | None = None, clock: Callable[[], float] = time.monotonic):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.tb_dir, self.mlflow, self.clock = cfg, tb_dir, mlflow, clock
        self.checkpointed = False  # whether this epoch wrote the checkpoint a resumed attempt would start from
        self.last: dict | None = None  # the latest epoch's metrics
        self.local = tempfile.mkdtemp(prefix="tb-") if storage.is_uri(tb_dir) else tb_dir
        # Each attempt writes files of its own; purge_step counts epochs here and steps in tb/steps.
        self.writer = SummaryWriter(self.local, purge_step=start_epoch + 1)
        self.step_writer = SummaryWriter(os.path.join(self.local, TB_DIR_STEPS),
                                         purge_step=start_epoch * steps_per_epoch + 1)
        self.progress = ProgressLines(progress_every_s, steps_per_epoch, cfg.schedule.epochs)
        self.loss_sum: torch.Tensor | None = None  # on the device: summed without a host sync
        self.loss_steps = 0
        self.logged_loss: float | None = None  # the latest step-logged value
        self.mirrored = clock()  # when the mirror was last brought up to date
        self.uploaded: dict[str, int] = {}  # mirrored file (relative path) -> its size then (bytes)

    def step_end(self, step: int, images: int, loss: torch.Tensor, lr: float) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.loss_steps += 1
        if step % self.cfg.run.log_every_steps == 0:
            self._log_step(step, lr)
        line = self.progress.step(step, images, self.logged_loss)
        if line:
            print(line, flush=True)

    def _log_step(self, step: int, lr: float) -> None:
        self.logged_loss = (self.loss_sum / self.loss_steps).item()  # the only host sync: once per interval
        self.loss_sum, self.loss_steps = None, 0
        self.step_writer.add_scalar(STEP_TAGS["train_loss"], self.logged_loss, step)
        self.step_writer.add_scalar(STEP_TAGS["lr"], lr, step)
        if self.mlflow:
            self.mlflow.add({STEP_TAGS["train_loss"]: self.logged_loss, STEP_TAGS["lr"]: lr}, step)
        self.step_writer.flush()  # on disk at once (a writer's own flush comes every 2 min): TensorBoard shows it
        if self.local != self.tb_dir and self.clock() - self.mirrored >= MIRROR_EVERY_S:
            self._mirror()

    def checkpoint_due(self, state, *, best: bool) -> None:
        self.checkpointed = True

    def epoch_end(self, metrics: dict) -> None:
        scalars = {tag: metrics[key] for key, tag in TB_TAGS.items() if key in metrics}  # val/* only with a val split
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, metrics["epoch"])
        self.writer.flush()
        if self.mlflow:
            self.mlflow.add(scalars, metrics["epoch"])
            if self.checkpointed:  # an attempt that dies from here on resumes after this epoch: no point twice
                self.mlflow.commit()
        if self.local != self.tb_dir and (self.checkpointed or self.clock() - self.mirrored >= MIRROR_EVERY_S):
            self._mirror()
        self.checkpointed = False
        print(epoch_line(metrics, self.cfg.schedule.epochs), flush=True)
        self.progress.epoch_done()
        self.last = metrics

    def _mirror(self) -> None:
        """Upload the event files that grew since the previous mirror (a writer only appends to its file)."""
        for path, size in storage.file_sizes(self.local).items():
            if self.uploaded.get(path) != size:
                with open(os.path.join(self.local, path), "rb") as f:
                    data = f.read(size)  # what was listed: bytes the writer appends meanwhile go next time
                storage.write_atomic(storage.join(self.tb_dir, path), data)
                self.uploaded[path] = size
        self.mirrored = self.clock()

    def close(self, params: int, hparams_extra: dict | None) -> None:
        """End the attempt; with `hparams_extra` (more hyperparameters, e.g. a sweep's swept keys; {} for none),
        first write the HParams entry of the epochs it trained."""
        if hparams_extra is not None and self.last:
            self._hparams(params, self.last, hparams_extra)
        self.writer.close()
        self.step_writer.close()
        if self.mlflow:  # the run ended (finished or diverged): no attempt will log these epochs again
            self.mlflow.commit()
        if self.local != self.tb_dir:
            self._mirror()
            shutil.rmtree(self.local, ignore_errors=True)

    def _hparams(self, params: int, metrics: dict, extra: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        cfg = self.cfg
        depth, shortcut = parse_model_name(cfg.model)
        hp = {"model": cfg.model, "depth": depth, "shortcut": str(shortcut), "params": params, "seed": cfg.seed,
              "dataset": cfg.data.dataset, "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay,
              "batch_size": cfg.optim.batch_size, "epochs": cfg.schedule.epochs, "num_workers":
              cfg.run.workers_text if cfg.run.elastic else cfg.run.num_workers,
              "batchnorm": cfg.batchnorm, "recipe": cfg.recipe, **extra}
        results = {"hparam/final_test_acc": metrics["test_acc"], "hparam/best_test_acc": metrics["best_test_acc"],
                   **({"hparam/best_val_acc": metrics["best_val_acc"]} if "best_val_acc" in metrics else {})}
        for summary in hparams(hp, results):
            self.writer.file_writer.add_summary(summary)
        for tag, value in results.items():
            self.writer.add_scalar(tag, value, metrics["epoch"])
