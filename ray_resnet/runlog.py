"""Rank 0's record of a run (pure): one console line per epoch, and TensorBoard events in <run dir>/tb.

Scalars are written per epoch under the tags of `constants.TB_TAGS`, and at the end an HParams entry (the run's
model, depth, seed, lr, ... against its final and best test accuracy). `report` reads the same tags back. When the
run dir is a URI, the events are written to a local directory and mirrored to <run dir>/tb after every epoch and at
the end, so a run killed mid-epoch has every finished epoch's events in storage.
"""

from __future__ import annotations

import shutil
import tempfile

from . import storage
from .config import Config
from .constants import TB_TAGS
from .fit import Hooks
from .models import parse_model_name


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


class RunLog(Hooks):
    """The console and TensorBoard side of one run attempt, which starts after `start_epoch` finished epochs."""

    def __init__(self, tb_dir: str, cfg: Config, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.tb_dir = cfg, tb_dir
        self.last: dict | None = None  # the latest epoch's metrics
        self.local = tempfile.mkdtemp(prefix="tb-") if storage.is_uri(tb_dir) else tb_dir
        # purge_step hides events a crashed attempt logged after the checkpoint we resume from (all of them
        # when it crashed before its first checkpoint was committed); each attempt writes a file of its own.
        self.writer = SummaryWriter(self.local, purge_step=start_epoch + 1)

    def epoch_end(self, metrics: dict) -> None:
        for key, tag in TB_TAGS.items():
            if key in metrics:  # val/* only with a val split
                self.writer.add_scalar(tag, metrics[key], metrics["epoch"])
        self._flush()
        print(epoch_line(metrics, self.cfg.schedule.epochs), flush=True)
        self.last = metrics

    def _flush(self) -> None:
        self.writer.flush()
        if self.local != self.tb_dir:
            storage.upload_dir(self.local, self.tb_dir)

    def close(self, params: int, hparams_extra: dict | None) -> None:
        """End the attempt; with `hparams_extra` (more hyperparameters, e.g. a sweep's swept keys; {} for none),
        first write the HParams entry of the epochs it trained."""
        if hparams_extra is not None and self.last:
            self._hparams(params, self.last, hparams_extra)
        self.writer.close()
        if self.local != self.tb_dir:
            storage.upload_dir(self.local, self.tb_dir)
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
