"""What a run does between epochs, where a run dir is in a bucket (moto's S3 server on 127.0.0.1): tb/ is mirrored
at checkpointed epochs, on a timer and at the end, not after every epoch (RunLog on a fake clock, no Ray); and a
run killed mid-way whose checkpoints Ray uploaded in the background (ASYNC) resumes from the latest committed one,
with every checkpointed epoch's events in the bucket (real Ray, `ray-resnet train` subprocesses)."""

import tempfile
from pathlib import Path

import pytest
import torch
from test_faults import TrainProcess, tb_steps
from test_fit import _cfg

from ray_resnet.core.runlog import MIRROR_EVERY_S, RunLog
from ray_resnet.io import storage

from cluster_scenarios import committed_epoch
from s3_server import BUCKET


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _epoch(log: RunLog, clock: Clock, epoch: int, checkpoint: bool, seconds: float) -> None:
    """What fit does to RunLog for one epoch of 2 steps (run.log_every_steps=2: one step point), whose evaluation
    takes `seconds` on `clock`."""
    for step in (2 * epoch - 1, 2 * epoch):
        log.step_end(step, 32, torch.tensor(1.0), 0.1)
    clock.now += seconds
    if checkpoint:
        log.checkpoint_due(lambda: None, best=False)
    log.epoch_end({"epoch": epoch, "train_loss": 1.0, "train_acc": 50.0, "test_loss": 1.0, "test_acc": 50.0,
                   "lr": 0.1, "train_images_per_s": 100.0, "test_images_per_s": 100.0, "epoch_time_s": 1.0,
                   "best_epoch": epoch, "best_test_acc": 50.0})


def test_tb_reaches_the_bucket_at_checkpoints_on_the_timer_and_at_the_end(s3_env):
    cfg = _cfg("schedule.epochs=6", "run.log_every_steps=2")
    tb, clock = f"s3://{BUCKET}/mirror/tb", Clock()
    log = RunLog(tb, cfg, 0, steps_per_epoch=2, progress_every_s=1e9, clock=clock)
    seen = []
    for epoch, checkpoint, seconds in [(1, False, 1), (2, True, 1), (3, False, 1), (4, False, MIRROR_EVERY_S),
                                       (5, False, 1), (6, True, 1)]:
        _epoch(log, clock, epoch, checkpoint, seconds)
        seen.append(tb_steps(tb.rsplit("/", 1)[0]) if storage.exists(tb) else [])
    assert seen == [[], [1, 2], [1, 2], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]
    assert tb_steps(tb.rsplit("/", 1)[0], "step/lr", "tb/steps") == [2, 4, 6, 8, 10, 12]
    log.close(1, {})  # the HParams entry, written at the end, is mirrored too
    assert tb_steps(tb.rsplit("/", 1)[0], "hparam/final_test_acc") == [6]
    assert len(storage.file_sizes(tb)) == 2  # tb/ and tb/steps: one event file each
    assert not Path(log.local).exists()  # the local copy is gone


@pytest.mark.ray
def test_a_driver_killed_after_an_async_uploaded_checkpoint_resumes_from_the_bucket(s3_env, real_cifar_small,
                                                                                    tmp_path):
    run, epochs = f"s3://{BUCKET}/runs/async", 4
    args = ("--set", "run.checkpoint_every=2")  # epoch 1 is never checkpointed: only the mirror of epoch 2 has it
    first = TrainProcess(tmp_path, real_cifar_small, "async", epochs, storage=f"s3://{BUCKET}/runs",
                         env=s3_env.env, args=args)
    first.kill_driver_when(lambda: committed_epoch(run) >= 2)
    committed = committed_epoch(run)
    assert committed == 2 and storage.read_json(f"{run}/result.json") is None
    assert set(range(1, committed + 1)) <= set(tb_steps(run))  # every checkpointed epoch's events are there

    temp_dirs = set(Path(tempfile.gettempdir()).glob("checkpoint-*"))
    second = TrainProcess(tmp_path, real_cifar_small, "async", epochs, "2", storage=f"s3://{BUCKET}/runs",
                          env=s3_env.env, args=args)
    assert second.finish() == 0, second.log[-3000:]
    assert f"resuming from the checkpoint of epoch {committed}" in second.log
    assert storage.read_json(f"{run}/result.json")["epoch"] == epochs
    assert tb_steps(run) == list(range(1, epochs + 1))  # every epoch once, across both attempts' event files
    assert tb_steps(run, "step/train_loss", "tb/steps") == list(range(2, 4 * epochs + 1, 2))  # every step once
    assert len(storage.read_json(f"{run}/environment.json")["attempts"]) == 2
    assert set(Path(tempfile.gettempdir()).glob("checkpoint-*")) <= temp_dirs  # Ray deleted each after its upload
