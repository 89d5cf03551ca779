"""When a run takes its latest checkpoint: every N epochs or M minutes (whichever comes first), always after the
last epoch, on a fake clock; the same decision on every rank (two torch.distributed processes on gloo, no Ray);
and best/ rewritten only with a checkpoint whose best epoch changed."""

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from test_fit import Recorder, _cfg, _data, _training

from ray_resnet.config import load_config
from ray_resnet.core.loop import CheckpointSchedule, fit
from ray_resnet.errors import ConfigError


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _due_epochs(schedule: CheckpointSchedule, clock: Clock, epoch_s: list[float], start_epoch: int = 0) -> list[int]:
    """The epochs `schedule` checkpoints when epoch start_epoch + 1, ... take `epoch_s` seconds each."""
    due = []
    for epoch, seconds in enumerate(epoch_s, start=start_epoch + 1):
        clock.now += seconds
        if schedule.due(epoch):
            due.append(epoch)
    return due


def test_due_every_n_epochs_and_after_the_last():
    clock = Clock()
    schedule = CheckpointSchedule(every_epochs=3, every_s=None, start_epoch=0, last_epoch=7, clock=clock)
    assert _due_epochs(schedule, clock, [1000.0] * 7) == [3, 6, 7]  # time does not count here


def test_due_every_m_minutes_of_rank_0s_clock_and_after_the_last():
    clock = Clock()
    schedule = CheckpointSchedule(every_epochs=None, every_s=60.0, start_epoch=0, last_epoch=10, clock=clock)
    # ends at 25, 50, 75 (due: 75 s since the start), 100, 125, 150 (due: 75 s since 75), 151, ...
    assert _due_epochs(schedule, clock, [25.0] * 6 + [1.0] * 4) == [3, 6, 10]


def test_whichever_bound_comes_first_counts_from_the_previous_checkpoint():
    clock = Clock()
    schedule = CheckpointSchedule(every_epochs=4, every_s=60.0, start_epoch=0, last_epoch=12, clock=clock)
    # fast epochs: 4 epochs before a minute; then slow ones: a minute before 4 epochs
    assert _due_epochs(schedule, clock, [10.0] * 5 + [40.0] * 4 + [10.0] * 3) == [4, 7, 9, 12]


def test_a_resumed_attempt_counts_from_its_checkpoint_and_its_own_start():
    clock = Clock()
    clock.now = 5000.0  # a new process: its clock knows nothing of the killed attempt
    schedule = CheckpointSchedule(every_epochs=3, every_s=60.0, start_epoch=5, last_epoch=20, clock=clock)
    assert _due_epochs(schedule, clock, [1.0] * 7, start_epoch=5) == [8, 11]


def test_the_config_keys_set_the_bounds_and_neither_means_every_epoch():
    for sets, every, every_s in [([], 1, None), (["run.checkpoint_every=5"], 5, None),
                                 (["run.checkpoint_every_min=0.5"], None, 30.0),
                                 (["run.checkpoint_every=5", "run.checkpoint_every_min=2"], 5, 120.0)]:
        schedule = CheckpointSchedule.of(load_config(None, sets), 0)
        assert (schedule.every_epochs, schedule.every_s) == (every, every_s), sets
    with pytest.raises(ConfigError, match="run.checkpoint_every_min: -1.0 is out of range: it must satisfy "
                                          "checkpoint_every_min > 0"):
        load_config(None, ["run.checkpoint_every_min=-1"])


def _rank(rank: int, port: int, out: dict) -> None:
    """One of two ranks; rank 1's clock runs 100x faster, so alone it would checkpoint every epoch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        clock = Clock()
        schedule = CheckpointSchedule(every_epochs=None, every_s=60.0, start_epoch=0, last_epoch=8, clock=clock)
        out[rank] = _due_epochs(schedule, clock, [25.0 * (100 if rank else 1)] * 8)
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_rank_0s_decision():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
        assert out[0] == out[1] == [3, 6, 8]  # rank 0's 25 s epochs


def test_fit_checkpoints_by_minutes_and_rewrites_best_only_when_it_changed():
    data = _data(_cfg())
    for minutes, expected in [(60.0, [3]), (1e-9, [1, 2, 3])]:  # an hour: only the end; ~0: every epoch
        cfg = _cfg("schedule.epochs=3", f"run.checkpoint_every_min={minutes}", "data.train_subset=64")
        hook = Recorder()
        fit(cfg, _training(cfg, data), data, hooks=[hook])
        checkpoints = [e[1:] for e in hook.events if e[0] == "checkpoint"]
        assert [epoch for epoch, _ in checkpoints] == expected
        best_epochs = [0] + [hook.states[epoch].best_epoch for epoch, _ in checkpoints]
        assert [best for _, best in checkpoints] == [b != a for a, b in zip(best_epochs, best_epochs[1:])]
        assert checkpoints[0][1]  # the first checkpoint always writes best/
        assert all(hook.states[epoch].best_epoch <= epoch for epoch, _ in checkpoints)
