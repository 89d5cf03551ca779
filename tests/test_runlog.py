"""Rank 0's record of a run without Ray: step-axis TensorBoard scalars (and what a resumed attempt leaves of them),
and when progress lines are printed, on a fake clock."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_fit import Recorder, _cfg, _data, _training

from ray_resnet.core.loop import fit
from ray_resnet.core.runlog import FIRST_PROGRESS_S, CompileNote, ProgressLines, RunLog, progress_every_s
from ray_resnet.core.steps import lr_at


def _scalars(directory, tag):
    """(step, value) of a tag as TensorBoard shows it: every event file of `directory`, purge_step applied."""
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


class LossRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.losses, self.lrs = {}, {}

    def step_end(self, step, images, loss, lr):
        self.losses[step], self.lrs[step] = loss.item(), lr


def test_step_tags_hold_the_mean_loss_and_the_lr_every_n_steps_beside_the_epoch_tags(tmp_path):
    cfg = _cfg("schedule.epochs=3", "schedule.warmup_epochs=3", "data.train_subset=64", "run.log_every_steps=3")
    data = _data(cfg)
    log, seen = RunLog(str(tmp_path / "tb"), cfg, 0, steps_per_epoch=2, progress_every_s=1e9), LossRecorder()
    fit(cfg, _training(cfg, data), data, hooks=[seen, log])  # 64 images in batches of 32: 2 steps per epoch
    log.close(1, {})

    losses = _scalars(tmp_path / "tb" / "steps", "step/train_loss")
    assert [step for step, _ in losses] == [3, 6]
    for (step, value), steps in zip(losses, ([1, 2, 3], [4, 5, 6])):  # the mean of the steps since the last point
        # float32 on the device (sum / 3) and in TensorBoard's file, float64 here: a few roundings of 6e-8 each
        assert value == pytest.approx(sum(seen.losses[s] for s in steps) / 3, rel=1e-6)
    lrs = _scalars(tmp_path / "tb" / "steps", "step/lr")
    # approx's rel 1e-6 absorbs TensorBoard's float32 (6e-8), and LambdaLR's base_lr * lr_at / base_lr (1 ulp)
    assert lrs == [(3, pytest.approx(seen.lrs[3])), (6, pytest.approx(seen.lrs[6]))]
    assert seen.lrs[3] == pytest.approx(lr_at(1.0, 0.05, cfg.schedule))  # step 3 trains at epoch 1.0 of the warmup
    assert lrs[0][1] < lrs[1][1]  # the ramp, within the epochs
    assert [step for step, _ in _scalars(tmp_path / "tb", "train/loss")] == [1, 2, 3]  # epochs, as before
    assert _scalars(tmp_path / "tb", "step/train_loss") == []  # the step tags have a run of their own


def _attempt(tb_dir, cfg, start_epoch, loss):
    log = RunLog(str(tb_dir), cfg, start_epoch, steps_per_epoch=4, progress_every_s=1e9)
    for step in range(start_epoch * 4 + 1, 13):  # three epochs of 4 steps
        log.step_end(step, 64, torch.tensor(loss), 0.1)
    log.close(1, None)


def test_a_resumed_attempt_replaces_the_step_points_a_crashed_one_logged_past_its_checkpoint(tmp_path):
    cfg = _cfg("schedule.epochs=3", "run.log_every_steps=2")
    _attempt(tmp_path, cfg, 0, 1.0)  # logged steps 2..12, then crashed; its latest checkpoint was of epoch 1
    _attempt(tmp_path, cfg, 1, 2.0)  # resumes at step 5
    assert _scalars(tmp_path / "steps", "step/train_loss") == [(2, 1.0), (4, 1.0), (6, 2.0), (8, 2.0), (10, 2.0),
                                                               (12, 2.0)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run_lines(every_s, steps_per_epoch=100, epochs=2, step_s=0.5, eval_s=5.0):
    """Drive ProgressLines through `epochs` epochs of steps taking `step_s` (64 images each): [(time, line)]."""
    clock, lines = Clock(), []
    progress = ProgressLines(every_s, steps_per_epoch, epochs, clock)
    for step in range(1, steps_per_epoch * epochs + 1):
        line = progress.step(step, 64, loss=2.5 if step > 100 else None)  # a loss is logged at step 100
        if line:
            lines.append((clock.now, line))
        if step % steps_per_epoch == 0:
            clock.now += eval_s
            progress.epoch_done()  # the epoch line
        clock.now += step_s
    return lines


def test_progress_lines_in_a_file_come_30_s_after_the_first_step_then_a_minute_apart():
    lines = _run_lines(progress_every_s(is_terminal=False), steps_per_epoch=400)
    # The first step ends at t=0; epoch 1 ends at t=199.5 (+5 s of evaluation); epoch 2's first step ends at 205.
    assert [t for t, _ in lines] == [FIRST_PROGRESS_S, 90.0, 150.0, 264.5, 324.5, 384.5]
    assert lines[0][1] == "epoch   1/2  step 61/400  128 img/s  epoch ETA 0:02:49"  # 339 steps of 0.5 s to go
    assert lines[3][1] == "epoch   2/2  step 120/400  loss 2.500  128 img/s  epoch ETA 0:02:20"


def test_progress_lines_on_a_terminal_come_every_5_s_and_never_in_short_epochs():
    lines = _run_lines(progress_every_s(is_terminal=True), steps_per_epoch=30, epochs=3)
    times = [t for t, _ in lines]
    assert times[0] == 5.0 and all(b - a >= 5.0 for a, b in zip(times, times[1:]))
    assert not any("step 30/30" in line for _, line in lines)  # the epoch line follows the last step
    assert len(lines) == 6  # 15 s of steps per epoch: steps 11 and 21 of each
    assert _run_lines(60.0, steps_per_epoch=20, epochs=3, eval_s=1.0) == []  # 10 s epochs: the epoch lines suffice


def test_a_compiled_models_first_step_is_announced_and_timed(capsys):
    now = [100.0]
    note = CompileNote(clock=lambda: now[0])
    assert capsys.readouterr().out == "torch.compile: compiling the training step in the first step (perf.compile)\n"
    now[0] += 36.2
    note.step_end(1, 128, torch.tensor(2.3), 0.1)
    note.step_end(2, 128, torch.tensor(2.2), 0.1)  # said once
    assert capsys.readouterr().out == "torch.compile: first step done in 36.2 s, compilation included\n"
