"""Fault tolerance on real Ray: a killed worker, a killed driver, a diverged loss, a half-written checkpoint.

The kill tests run `ray-resnet train` as a subprocess with its own embedded Ray (its own process tree, which
the test kills by pid and then cleans up); the others use the session's local Ray.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ray_resnet.checkpoint import load_checkpoint
from ray_resnet.config import load_config
from ray_resnet.train import RunError, run_training

REPO = Path(__file__).resolve().parents[1]
# 256 train images in batches of 64 (4 steps) and 200 test images: one epoch takes a few seconds on 2 cores.
TINY = ["data.train_subset=256", "data.test_subset=200", "optim.batch_size=64", "schedule.warmup_epochs=0",
        "optim.lr=0.05", "perf.eval_batch_size=200"]


def _cfg(root, storage, name, *sets):
    return load_config(None, [f"data.root={root}", f"run.storage={storage}", f"run.name={name}", *TINY, *sets])


def tb_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    """Steps of a tag as TensorBoard shows them: all event files of tb/, with purge_step applied."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def committed_epochs(run_dir: Path) -> list[int]:
    """Epochs of the checkpoints Ray Train has committed (the ones it would resume from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    return sorted(int(e) for e in __import__("re").findall(r'\\?"epoch\\?": (\d+)', snapshot.read_text()))


# --- d. divergence, e. half-written checkpoints: the session's local Ray ------------------------------------

@pytest.mark.usefixtures("ray_local")
def test_nan_loss_stops_at_once_naming_epoch_and_intact_checkpoint(real_cifar_small, tmp_path):
    # Epoch 1 trains at lr 0.05, then gamma 1e9 makes lr 5e7 from epoch 2: the loss overflows.
    cfg = _cfg(real_cifar_small, tmp_path, "nan", "schedule.epochs=4", "schedule.milestones=[1]",
               "schedule.gamma=1e9", "run.max_failures=3")
    run_dir = tmp_path / "nan"
    start = time.perf_counter()
    with pytest.raises(RunError, match=r"training loss became (nan|inf) in epoch 2; stopped without retrying: "
                                       r"the last good checkpoint is .*checkpoint_.* \(epoch 1\), left intact") as e:
        run_training(cfg)
    elapsed = time.perf_counter() - start
    checkpoint = str(e.value).split("the last good checkpoint is ")[1].split(" (epoch")[0]
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 1 and all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())
    assert load_checkpoint(run_dir / "best")["epoch"] == 1
    assert not (run_dir / "result.json").exists()  # the run is not "finished"
    assert tb_steps(run_dir) == [1]
    print(f"\n[fault d] NaN injected via lr x1e9 at epoch 2: stopped in {elapsed:.1f}s, no retries, "
          f"last good checkpoint epoch 1")

    # Divergence in the very first epoch: nothing to keep, and the message says so.
    with pytest.raises(RunError, match="in epoch 1; .*no checkpoint was written before it"):
        run_training(_cfg(real_cifar_small, tmp_path, "nan1", "schedule.epochs=2", "optim.lr=1e9"))


@pytest.mark.usefixtures("ray_local")
def test_half_written_checkpoint_is_never_resumed_from(real_cifar_small, tmp_path):
    run_dir = tmp_path / "half"
    run_training(_cfg(real_cifar_small, tmp_path, "half", "schedule.epochs=1"))
    good = next(run_dir.glob("checkpoint_*"))
    # A crash while saving epoch 2: Ray's dir is there (newest name) but its file is truncated, and our own
    # atomic save died before the rename (only checkpoint.pt.tmp); best/ was being rewritten too.
    half = run_dir / "checkpoint_2999-01-01_00-00-00.000000"
    half.mkdir()
    data = (good / "checkpoint.pt").read_bytes()
    (half / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    (run_dir / "best" / "checkpoint.pt.tmp").write_bytes(data[: len(data) // 3])

    summary = run_training(_cfg(real_cifar_small, tmp_path, "half", "schedule.epochs=2"))
    assert summary["epoch"] == 2 and Path(summary["checkpoint"]).parent == run_dir
    assert Path(summary["checkpoint"]) != half and load_checkpoint(summary["checkpoint"])["epoch"] == 2
    assert tb_steps(run_dir) == [1, 2]  # resumed after epoch 1: epoch 1 not trained twice
