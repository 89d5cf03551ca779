"""End-to-end training through Ray Train's TorchTrainer on a real local Ray (2 CPUs) and real CIFAR-10 rows."""

import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ray_resnet.apps import cli
from ray_resnet.config import load_config, replace, save_config
from ray_resnet.core.checkpoint import load_checkpoint
from ray_resnet.core.loop import Hooks
from ray_resnet.errors import ConfigError, RunError
from ray_resnet.io.rundir import resolve_run
from ray_resnet.raytrain.driver import run_training

from fixtures import still_running_at, train_controller_pids

pytestmark = pytest.mark.usefixtures("ray_local")


def _cfg(root, storage, name, *sets):
    return load_config(None, [f"data.root={root}", f"run.storage={storage}", f"run.name={name}",
                              "optim.batch_size=128", "schedule.warmup_epochs=0", "schedule.milestones=[]", "optim.lr=0.05",
                              "perf.eval_batch_size=250", *sets])


def _scalars(run_dir, tag, tb_dir="tb"):
    """(step, value) pairs of a tag, over every event file of the run's tb/ dir (or `tb_dir`), in file order."""
    out = []
    for events in sorted((run_dir / tb_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.append([(e.step, e.value) for e in acc.Scalars(tag)])
    return out


def test_two_workers_learn_checkpoint_log_resume_and_eval(real_cifar_small, tmp_path, capsys):
    cfg = _cfg(real_cifar_small, tmp_path, "r20", "schedule.epochs=2", "run.num_workers=2", "run.log_every_steps=4")
    first = run_training(cfg)
    run_dir = tmp_path / "r20"
    assert first.epoch == 2 and 0 <= first.final_test_acc <= 100
    assert (run_dir / "config.yaml").is_file() and (run_dir / "result.json").is_file()
    assert load_checkpoint(first.checkpoint).epoch == 2

    # Rerunning the same name with more epochs resumes: the second attempt trains epoch 3 only.
    second = run_training(_cfg(real_cifar_small, tmp_path, "r20", "schedule.epochs=3", "run.num_workers=2",
                               "run.log_every_steps=4"))
    assert second.epoch == 3
    per_file = _scalars(run_dir, "train/loss")
    assert [step for step, _ in per_file[0]] == [1, 2] and [step for step, _ in per_file[1]] == [3]
    losses = [v for f in per_file for _, v in f]
    assert losses[-1] < losses[0], f"training loss did not decrease: {losses}"
    for tag in ("test/acc", "test/loss", "train/acc", "lr", "perf/train_images_per_s", "perf/epoch_time_s"):
        assert sum(len(f) for f in _scalars(run_dir, tag)) == 3, tag
    # 1,024 images in batches of 128: 8 steps per epoch, a point every 4th step, in each attempt's own file.
    assert [[step for step, _ in f] for f in _scalars(run_dir, "step/train_loss", "tb/steps")] == [[4, 8, 12, 16],
                                                                                                  [20, 24]]
    attempts = json.loads((run_dir / "environment.json").read_text())["attempts"]
    assert [[g["workers"] for g in a["worker_groups"]] for a in attempts] == [[2], [2]]  # the first one is kept
    assert [r["rank"] for r in attempts[1]["worker_groups"][0]["ranks"]] == [0, 1]

    # A finished run says so and trains nothing, also when its data has moved (data.root is not recipe).
    moved = tmp_path / "moved-data"
    shutil.copytree(real_cifar_small, moved)
    again = run_training(_cfg(moved, tmp_path, "r20", "schedule.epochs=3", "run.num_workers=2"))
    assert again.already_finished and again.epoch == 3

    # A torn result.json (as an older version could leave it) does not break the rerun: it finishes again.
    (run_dir / "result.json").write_text('{"name": "r20", "epo')
    assert run_training(_cfg(real_cifar_small, tmp_path, "r20", "schedule.epochs=3", "run.num_workers=2")).epoch == 3
    assert json.loads((run_dir / "result.json").read_text())["status"] == "finished"

    # eval on the best checkpoint reproduces the accuracy recorded during training, and says what it evaluated.
    best = load_checkpoint(run_dir)
    assert best.epoch == second.best_epoch
    assert cli.main(["eval", "--checkpoint", str(run_dir / "best"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["count"] == 500 and evaluated["kind"] == "best"
    # The workers evaluated 250 images each with 1 torch thread, eval here with this process's threads: float32
    # kernels may round otherwise; 1 image of 500 is 0.2 points.
    assert evaluated["acc"] == pytest.approx(best.metrics["test_acc"], abs=0.41)  # <= 2 borderline flips
    assert cli.main(["eval", "--checkpoint", str(run_dir)]) == 0
    assert f"from the best checkpoint (epoch {best.epoch}: the highest test accuracy during training, i.e. " \
           "selected on the test set" in capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", str(run_dir), "--final"]) == 0
    assert "from the final checkpoint of epoch 3," in capsys.readouterr().out


def test_a_compiled_run_trains_in_a_ray_worker_and_says_what_compiling_took(real_cifar_small, tmp_path, capsys):
    """perf.compile on a CPU worker (auto's choice for long runs with several workers, or bf16 on AMX): inductor
    compiles inside Ray's worker process, and rank 0 announces the first step and times it."""
    cfg = _cfg(real_cifar_small, tmp_path, "compiled", "model=resnet8", "perf.compile=on", "schedule.epochs=1",
               "data.train_subset=256")
    summary = run_training(cfg)
    assert (summary.status, summary.epoch) == ("finished", 1)
    out = capsys.readouterr().out
    assert "torch.compile: compiling the training step in the first step (perf.compile)" in out
    assert re.search(r"torch\.compile: first step done in \d+\.\d s, compilation included", out), out[-3000:]


def test_same_seed_gives_the_same_first_epoch(real_cifar_small, tmp_path):
    losses = []
    for name in ("a", "b"):
        run_training(_cfg(real_cifar_small, tmp_path, name, "schedule.epochs=1", "data.train_subset=256"))
        losses.append(load_checkpoint(tmp_path / name / "best").metrics["train_loss"])
    assert losses[0] == losses[1]
    run_training(_cfg(real_cifar_small, tmp_path, "c", "schedule.epochs=1", "data.train_subset=256", "seed=1"))
    assert load_checkpoint(tmp_path / "c" / "best").metrics["train_loss"] != losses[0]


def test_more_workers_than_the_cluster_has_fails_fast(real_cifar_small, tmp_path):
    with pytest.raises(RunError, match="do not fit on this cluster"):
        run_training(_cfg(real_cifar_small, tmp_path, "big", "run.num_workers=3", "run.cpus_per_worker=1"))
    with pytest.raises(RunError, match="do not fit"):
        run_training(_cfg(real_cifar_small, tmp_path, "gpu", "run.device=cuda"))


def test_a_run_dir_with_another_recipe_is_not_resumed(real_cifar_small, tmp_path):
    cfg = resolve_run(_cfg(real_cifar_small, tmp_path, "r", "schedule.epochs=1"))
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    save_config(replace(cfg, model="resnet32", optim={"lr": 0.2}), run_dir / "config.yaml")
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(RunError, match="another config \\(model: 'resnet32' -> 'resnet20'; optim.lr: 0.2 -> 0.05\\).*new --name"):
        run_training(cfg)
    assert (run_dir / "config.yaml").read_text() == saved


def test_cli_smoke_test_trains_and_prints_the_summary(real_cifar_small, tmp_path, capsys):
    args = ["train", "-c", str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"), "--smoke-test",
            "--data", str(real_cifar_small), "--storage", str(tmp_path)]
    ctrl_c, controllers_before = signal.getsignal(signal.SIGINT), set(train_controller_pids())
    assert cli.main(args) == 0
    # Ray Train's own Ctrl-C handler (it aborts the run) is gone with the run, and so is its controller's process
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    (controller,) = set(train_controller_pids()) - controllers_before
    assert not still_running_at({controller}, time.monotonic() + 10)
    out = capsys.readouterr().out
    run_dir = tmp_path / "quickstart-smoke"  # never the real quickstart run
    assert f"run dir: {run_dir}" in out and "1/1 epochs" in out and "final test acc" in out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epoch"] == 1 and result["params"] == 269_722
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


class _FailsLikeBadConfig(Hooks):
    """Raises an error the user must fix at the first epoch's end, and counts the worker starts."""

    def __init__(self, starts: Path):
        with starts.open("a") as f:
            f.write("start\n")

    def epoch_end(self, metrics):
        raise ConfigError("data.train_subset: this worker cannot use it (raised in the worker)")


def test_an_error_a_worker_raises_deterministically_ends_the_run_without_retries(real_cifar_small, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    starts = tmp_path / "starts"
    cfg = _cfg(real_cifar_small, tmp_path, "det", "schedule.epochs=2", "data.train_subset=128", "run.max_failures=3")
    with pytest.raises(RunError, match=r"^data.train_subset: this worker cannot use it \(raised in the worker\) "
                                       r"\(raised on a worker: stopped without retrying"):
        run_training(cfg, worker_hooks=lambda: [_FailsLikeBadConfig(starts)])
    assert starts.read_text() == "start\n"  # one worker group, never restarted
    assert not (tmp_path / "det" / "result.json").exists()
