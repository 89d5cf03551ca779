"""The training loop without Ray: its hooks, the NaN stop, and a resume from its checkpoint state that trains
exactly what the uninterrupted run trains."""

import pytest
import torch

from ray_resnet.config import load_config
from ray_resnet.core.batches import eval_shard
from ray_resnet.core.checkpoint import CheckpointState, load_checkpoint, save_checkpoint, sync_best
from ray_resnet.core.loop import Diverged, Hooks, build_training, fit, select_splits, steps_per_epoch

from fixtures import colour_coded_cifar

CPU = torch.device("cpu")


def _data(cfg, n=96):
    (train_images, train_labels), (test_images, test_labels) = colour_coded_cifar(n, 0), colour_coded_cifar(40, 1)
    return select_splits(cfg, {"train_images": train_images, "train_labels": train_labels,
                               "test_images": test_images, "test_labels": test_labels})


def _cfg(*sets):
    return load_config(None, ["model=resnet8", "optim.batch_size=32", "schedule.warmup_epochs=0", "schedule.milestones=[]",
                              "optim.lr=0.05",
                              "perf.eval_batch_size=40", *sets])


def _training(cfg, data):
    return build_training(cfg, CPU, steps_per_epoch(cfg, len(data.train_index), 1))


class Recorder(Hooks):
    def __init__(self):
        self.events, self.states = [], {}

    def step_end(self, step, images, loss, lr):
        self.events.append(("step", step, images))

    def checkpoint_due(self, state, *, best):
        contents = state()
        self.states[contents.epoch] = contents
        self.events.append(("checkpoint", contents.epoch, best))

    def epoch_end(self, metrics):
        self.events.append(("epoch", metrics["epoch"]))
        self.last = metrics


def test_fit_calls_its_hooks_in_order_with_the_run_state():
    cfg = _cfg("schedule.epochs=3", "run.checkpoint_every=2", "data.train_subset=64")
    data = _data(cfg)
    hook = Recorder()
    assert fit(cfg, _training(cfg, data), data, hooks=[hook]) is None
    steps = [e for e in hook.events if e[0] == "step"]
    assert steps == [("step", s, 32) for s in range(1, 7)]  # 64 images in batches of 32: 2 steps per epoch
    checkpoints = [e[1] for e in hook.events if e[0] == "checkpoint"]
    assert checkpoints == [2, 3]  # every 2 epochs, and after the last
    assert hook.events[-1] == ("epoch", 3) and hook.events.index(("epoch", 1)) > hook.events.index(("step", 2, 32))
    assert {"train_loss", "test_acc", "best_test_acc", "best_epoch", "lr", "epoch_time_s"} <= set(hook.last)
    state = hook.states[3]
    assert state.epoch == 3 and state.config["model"] == "resnet8" and state.metrics["epoch"] == 3


def test_the_first_epoch_is_the_best_so_far_even_at_zero_accuracy():
    cfg = _cfg("schedule.epochs=1", "data.train_subset=64")
    data = _data(cfg)
    data.train_labels = torch.zeros_like(data.train_labels)  # it learns "class 0"; every test image is class 9
    data.test_labels = torch.full_like(data.test_labels, 9)
    hook = Recorder()
    fit(cfg, _training(cfg, data), data, hooks=[hook])
    assert hook.last["test_acc"] == 0
    assert [e for e in hook.events if e[0] == "checkpoint"] == [("checkpoint", 1, True)]
    assert hook.last["best_epoch"] == 1


def test_a_nan_loss_stops_the_loop_at_once():
    cfg = _cfg("schedule.epochs=3", "optim.lr=1e12")
    data = _data(cfg)
    hook = Recorder()
    outcome = fit(cfg, _training(cfg, data), data, hooks=[hook])
    assert isinstance(outcome, Diverged) and outcome.epoch == 1 and not torch.isfinite(torch.tensor(outcome.loss))
    assert not [e for e in hook.events if e[0] in ("checkpoint", "epoch")]


def test_resuming_from_the_checkpoint_state_trains_what_the_uninterrupted_run_trains():
    cfg = _cfg("schedule.epochs=2", "schedule.warmup_epochs=1")  # warmup: the schedule's state matters too
    data = _data(cfg)
    whole = _training(cfg, data)
    fit(cfg, whole, data)

    first = Recorder()
    fit(_cfg("schedule.epochs=1", "schedule.warmup_epochs=1"), _training(cfg, data), data, hooks=[first])
    resumed = _training(cfg, data)
    progress = first.states[1].restore(resumed)
    assert progress.epoch == 1
    fit(cfg, resumed, data, progress=progress)
    for a, b in zip(whole.core.state_dict().values(), resumed.core.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # bit for bit: the same ops in one process
    # both schedulers compute base_lr * lr_at(...) / base_lr in float64: equal; approx's rel 1e-6 is slack only
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(whole.optimizer.param_groups[0]["lr"])


def test_best_dir_follows_the_checkpoint_a_run_resumes_from(tmp_path):
    """A crash after epoch 3 wrote best/ but before its checkpoint was committed: the run resumes from epoch 1,
    and best/ must not keep the model of epoch 3, which is trained again."""
    cfg = _cfg("schedule.epochs=3")
    data = _data(cfg)
    hook = Recorder()
    fit(cfg, _training(cfg, data), data, hooks=[hook])
    best_dir = tmp_path / "best"
    save_checkpoint(hook.states[3].best_only(), best_dir)  # what the crashed attempt left
    committed = hook.states[1]

    sync_best(committed, best_dir)
    best = load_checkpoint(best_dir)
    assert best.epoch == committed.best_epoch == 1 and best.kind == "best"
    for key, value in committed.model.items():
        assert torch.equal(best.model[key], value)
    before = (best_dir / "checkpoint.pt").stat().st_mtime_ns
    sync_best(committed, best_dir)  # already in agreement: left alone
    assert (best_dir / "checkpoint.pt").stat().st_mtime_ns == before
    sync_best(None, best_dir)  # resumed from the start: no best yet
    assert not (best_dir / "checkpoint.pt").exists()


def test_a_later_checkpoint_still_holds_the_best_epochs_model():
    cfg = _cfg("schedule.epochs=3", "optim.lr=0.05")
    data = _data(cfg)
    hook = Recorder()
    fit(cfg, _training(cfg, data), data, hooks=[hook])
    last = hook.states[3]
    best_epoch = last.best_epoch
    assert last.best.metrics["epoch"] == best_epoch
    if best_epoch in hook.states:  # the best epoch's own checkpoint: the same weights
        for key, value in hook.states[best_epoch].model.items():
            assert torch.equal(last.best.model[key], value)


def _arrays(n=200):
    (train_images, train_labels), (test_images, test_labels) = colour_coded_cifar(n, 0), colour_coded_cifar(40, 1)
    return {"train_images": train_images, "train_labels": train_labels, "test_images": test_images,
            "test_labels": test_labels}


def test_the_val_split_is_disjoint_class_balanced_and_chosen_by_the_seed_alone():
    arrays = _arrays()
    data = select_splits(_cfg("data.val_split=50"), arrays)
    val, train = set(data.val_index.tolist()), set(data.train_index.tolist())
    assert len(val) == 50 and not val & train and len(val | train) == 200  # the rest trains
    assert torch.bincount(arrays["train_labels"][data.val_index]).tolist() == [5] * 10
    # what a rank evaluates does not change the split: every world size covers it exactly once
    for world in (1, 2, 3):
        again = select_splits(_cfg("data.val_split=50"), arrays)
        shards = [again.val_index[eval_shard(len(again.val_index), world, r)] for r in range(world)]
        assert torch.equal(torch.cat(shards), data.val_index)
    # data.train_subset picks from what the split leaves; the split stays the same
    subset = select_splits(_cfg("data.val_split=50", "data.train_subset=60"), arrays)
    assert torch.equal(subset.val_index, data.val_index) and len(subset.train_index) == 60
    assert not set(subset.train_index.tolist()) & val
    other = select_splits(_cfg("data.val_split=50", "seed=1"), arrays)
    assert not torch.equal(other.val_index, data.val_index)
    assert select_splits(_cfg(), arrays).val_index is None


def test_the_pixel_mean_is_the_mean_image_of_the_training_images_only():
    arrays = _arrays()
    cfg = _cfg("data.val_split=50", "data.normalize=pixel_mean")
    data = select_splits(cfg, arrays)
    expected = arrays["train_images"][data.train_index].double().mean(0) / 255
    # float32's default rtol 1.3e-6: two float64 means (sum / (255 n) vs mean / 255) cast to float32, <= 1 ulp apart
    torch.testing.assert_close(data.pixel_mean, expected.float())
    assert data.pixel_mean.shape == (3, 32, 32) and data.pixel_mean.dtype == torch.float32
    changed = {**arrays, "train_images": arrays["train_images"].clone(),
               "test_images": torch.full_like(arrays["test_images"], 255)}
    changed["train_images"][data.val_index] = 255  # neither val nor test images enter the mean
    assert torch.equal(select_splits(cfg, changed).pixel_mean, data.pixel_mean)
    assert select_splits(_cfg(), arrays).pixel_mean is None


def test_best_follows_validation_accuracy_and_keeps_its_test_accuracy():
    arrays = _arrays(160)
    arrays["test_labels"] = arrays["test_labels"][torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    cfg = _cfg("schedule.epochs=4", "data.val_split=40", "data.normalize=pixel_mean", "optim.lr=0.02")
    data = select_splits(cfg, arrays)
    hook, epochs = Recorder(), []
    hook.epoch_end = lambda metrics: epochs.append(metrics)
    fit(cfg, _training(cfg, data), data, hooks=[hook])
    best = max(epochs, key=lambda m: (m["val_acc"], -m["epoch"]))  # the first epoch of the highest val acc
    last = epochs[-1]
    assert (last["best_epoch"], last["best_val_acc"], last["best_test_acc"]) == (
        best["epoch"], best["val_acc"], best["test_acc"])
    new_bests = [e[1] for e in hook.events if e[0] == "checkpoint" and e[2]]  # checkpoints every epoch
    assert new_bests == [m["epoch"] for i, m in enumerate(epochs)
                         if m["val_acc"] > max([0.0] + [p["val_acc"] for p in epochs[:i]])]
    state = hook.states[4]
    assert torch.equal(state.pixel_mean, data.pixel_mean) and state.best_only().best_val_acc == best["val_acc"]


def test_checkpoints_from_before_val_splits_resume():
    cfg = _cfg("schedule.epochs=1")
    data = _data(cfg)
    hook = Recorder()
    fit(cfg, _training(cfg, data), data, hooks=[hook])
    old = {k: v for k, v in hook.states[1].to_dict().items() if k not in ("best_val_acc", "pixel_mean", "format_version")}
    resumed = _training(cfg, data)
    progress = CheckpointState.from_dict(old, "old.pt").restore(resumed)
    assert (progress.best_val_acc, progress.best_test_acc) == (0.0, hook.states[1].best_test_acc)


def test_a_checkpoint_of_a_newer_format_is_refused_naming_both_versions(tmp_path):
    from ray_resnet.core.checkpoint import FORMAT_VERSION
    from ray_resnet.errors import CheckpointFormatError

    cfg = _cfg("schedule.epochs=1")
    data = _data(cfg)
    hook = Recorder()
    fit(cfg, _training(cfg, data), data, hooks=[hook])
    save_checkpoint(hook.states[1], tmp_path / "today")
    assert load_checkpoint(tmp_path / "today").format_version == FORMAT_VERSION  # today's files read back as written
    torch.save({**hook.states[1].to_dict(), "format_version": FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointFormatError, match=f"a checkpoint of format {FORMAT_VERSION + 1}, written by a newer "
                                                    f"ray-resnet .this one reads formats up to {FORMAT_VERSION}."):
        load_checkpoint(tmp_path / "newer.pt")


def test_eval_of_a_pixel_mean_run_normalises_as_training_did(tmp_path, cache_dir, capsys):
    import json

    from ray_resnet.apps import cli

    from fixtures import write_parquet_cifar

    arrays = _arrays(160)
    write_parquet_cifar(tmp_path / "cifar", arrays["test_images"], arrays["test_labels"], "test")
    cfg = _cfg("schedule.epochs=1", "data.val_split=40", "data.normalize=pixel_mean", f"data.root={tmp_path / 'cifar'}")
    data = select_splits(cfg, arrays)
    hook = Recorder()
    fit(cfg, _training(cfg, data), data, hooks=[hook])
    save_checkpoint(hook.states[1].best_only(), tmp_path / "best")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "best"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The same weights, images and batch (40) in fp32 in this process: equal unless a kernel rounds otherwise; 1 image
    # is 2.5 points, so this allows 1 borderline top-1 flip.
    assert evaluated["acc"] == pytest.approx(hook.states[1].metrics["test_acc"], abs=2.6)  # <= 1 of 40 flips
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "best")]) == 0
    assert "the highest validation accuracy during training, on 40 held-out training images" in capsys.readouterr().out
