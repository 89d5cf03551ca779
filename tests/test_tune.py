"""Ray Tune sweeps on a real local Ray (2 CPUs) and real CIFAR-10 rows, plus sweep-file validation and `report`."""

import csv
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ray_resnet.apps import cli
from ray_resnet.apps.report import read_runs
from ray_resnet.config import load_config
from ray_resnet.errors import SweepError
from ray_resnet.raytrain.driver import load_dataset
from ray_resnet.raytrain.sweep import (
    _max_concurrent,
    _record_trial_error,
    grid_configs,
    load_sweep,
    run_sweep,
    trial_count,
    trial_name,
    tune_metric,
)

from fixtures import colour_coded_cifar, own_lines, write_parquet_cifar

CONFIGS = Path(__file__).parents[1] / "configs"
# Tiny trials: 1 CPU each so two run at once on the 2-CPU test cluster.
TINY = {"data": {"train_subset": 128, "test_subset": 64}, "optim": {"batch_size": 64},
        "schedule": {"epochs": 1, "warmup_epochs": 0, "milestones": []}, "perf": {"eval_batch_size": 64}}


def _write(path, sweep):
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


# A sweep whose trials Tune stops (ASHA, an interrupt) runs with run.max_failures=0. Ray 2.60 marks a stopped trial's
# Train controller dead at once, which kills its workers; the controller process, still running for a moment, can
# take that for a worker failure and start a new worker group whose placement group then outlives it (Ray Train's
# cleaner never heard of it). With no restarts allowed it ends instead (seen once in CI).
NO_WORKER_RESTARTS = {"max_failures": 0}


def _hparam_names(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    names = set()
    for events in (run_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for content in acc.PluginTagToContent("hparams").values():
            names |= set(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    return names


def _object_store_bytes_created() -> int:
    """Bytes ever created in the local Ray's object stores (Ray's own count, as `ray memory --stats-only` reads)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return reply.store_stats.cumulative_created_bytes


def _scalar_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (run_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_shipped_sweep_files_are_valid():
    table6 = load_sweep(CONFIGS / "sweep_table6.yaml")
    assert trial_count(table6) == 30 and table6.grid["model"][-1] == "resnet1202" and table6.asha is None
    assert table6.base["run"]["gpus_per_worker"] == 0.25
    lr_wd = load_sweep(CONFIGS / "sweep_lr_wd.yaml")
    assert trial_count(lr_wd) == 16 and set(lr_wd.search) == {"optim.lr", "optim.weight_decay"} and lr_wd.asha
    recipes = load_sweep(CONFIGS / "sweep_recipes.yaml")
    assert trial_count(recipes) == 75 and recipes.grid["recipe"] == ["timm", "paper", "reproduction"]
    assert {c.data.val_split for c in grid_configs(recipes)} == {5000} and tune_metric(recipes) == "val_acc"
    assert tune_metric(table6) == "test_acc"
    degradation = load_sweep(CONFIGS / "sweep_degradation.yaml")
    assert {"plain20", "plain56", "resnet20", "resnet56"} <= set(degradation.grid["model"])


@pytest.mark.parametrize("sweep, message", [
    ({"grdi": {"seed": [0]}}, "unknown key 'grdi'; valid keys: name, storage, config, grid"),
    ({"grid": {"optim.lrr": [0.1]}}, "grid.optim.lrr: unknown key 'optim.lrr'; valid keys: optim.lr"),
    ({"grid": {"model": ["resnet20", "resnet30"]}}, "grid.model: model: CIFAR ResNet depth must be 6n\\+2"),
    ({"grid": {"seed": [0, 0]}}, "grid.seed: values repeat"),
    ({"grid": {"seed": 3}}, "grid.seed: expected a non-empty list"),
    ({"search": {"optim.lr": {"logunifrom": [0.01, 1]}}}, "search.optim.lr: expected one of \\{uniform: ..."),
    ({"search": {"optim.lr": {"loguniform": [0, 1]}}}, "loguniform: low must be > 0"),
    ({"search": {"run.num_workers": {"uniform": [1, 2]}}}, "search.run.num_workers: run.num_workers: expected int"),
    ({"grid": {"seed": [0]}, "search": {"seed": {"randint": [0, 9]}}}, "seed is in both grid and search"),
    ({"config": {"optim": {"momentun": 0.9}}}, "unknown key 'optim.momentun'"),
    ({"config": {"run": {"name": "x"}}}, "config.run.name: the sweep names and places every trial itself"),
    ({"resources": {"gpus": 1}}, "unknown key 'resources.gpus'; valid keys: resources.workers_per_trial"),
    ({"resources": {"gpus_per_worker": "a quarter"}}, "run.gpus_per_worker: expected float"),
    ({"resources": {"max_concurrent_trials": 0}}, "max_concurrent_trials: expected an int >= 1"),
    ({"scheduler": {"asha": {"grace": 1}}}, "unknown key 'scheduler.asha.grace'"),
    ({"scheduler": {"hyperband": {}}}, "scheduler: expected null or \\{asha:"),
    ({"num_samples": 0}, "num_samples: expected an int >= 1"),
])
def test_bad_sweep_files_name_the_key(tmp_path, sweep, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(_write(tmp_path / "bad.yaml", sweep))


def test_cli_reports_sweep_and_report_errors_in_one_line(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", {"grid": {"optim.lrr": [0.1]}})
    assert cli.main(["sweep", "-c", str(bad)]) == 2
    assert cli.main(["report", str(tmp_path)]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 2
    assert err[0].startswith("ray-resnet: error: ") and "optim.lrr" in err[0]
    assert err[1] == (f"ray-resnet: error: {tmp_path} is not a sweep dir: expected sweep.yaml and one run dir per "
                      "trial, as `ray-resnet sweep` writes them (e.g. runs/sweeps/table6)")


@pytest.mark.usefixtures("ray_local")
def test_a_trial_that_cannot_fit_fails_before_any_trial_starts(real_cifar_small, tmp_path):
    file = _write(tmp_path / "big.yaml", {"config": {**TINY, "data": {"root": str(real_cifar_small)}},
                                          "resources": {"workers_per_trial": 3, "cpus_per_worker": 1}})
    sweep = load_sweep(file, storage=str(tmp_path / "sweeps"))
    with pytest.raises(SweepError, match="one trial cannot fit on this cluster: 3 worker\\(s\\) x \\{'CPU': 1\\}"):
        run_sweep(sweep)
    assert not Path(sweep.dir).exists()


@pytest.mark.usefixtures("ray_local")
def test_grid_sweep_interrupted_resumed_and_reported(real_cifar_small, tmp_path, capsys):
    file = _write(tmp_path / "grid.yaml", {
        "name": "grid", "config": {**TINY, "data": {**TINY["data"], "root": str(real_cifar_small)},
                                   "run": NO_WORKER_RESTARTS},
        "grid": {"model": ["resnet20", "plain20"], "seed": [0, 1]},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    })
    args = ["sweep", "-c", str(file), "--storage", str(tmp_path / "sweeps")]
    sweep_dir = tmp_path / "sweeps" / "grid"

    # Interrupt the sweep as Ctrl-C would, once its first trial has finished (SIGUSR1 is Tune's other stop signal;
    # pytest keeps SIGINT for itself).
    def interrupt_after_first_trial():
        while not list(sweep_dir.glob("*/result.json")):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)

    start, created = time.perf_counter(), _object_store_bytes_created()
    threading.Thread(target=interrupt_after_first_trial, daemon=True).start()
    assert cli.main(args) == 0
    first_wall = time.perf_counter() - start
    finished = {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in sweep_dir.glob("*/result.json")}
    assert 1 <= len(finished) < 4
    checkpoints = {name: sorted(p.name for p in (sweep_dir / name).glob("checkpoint_*")) for name in finished}
    assert "interrupted (those continue with the same command + --resume)" in capsys.readouterr().out

    assert cli.main(args) == 2  # the same command without --resume refuses to touch the existing sweep
    assert "already exists: continue it with --resume" in capsys.readouterr().err

    start = time.perf_counter()
    assert cli.main([*args, "--resume"]) == 0
    resume_wall = time.perf_counter() - start
    assert "sweep grid: 4/4 trials finished, 0 diverged (loss NaN/inf), 0 failed" in capsys.readouterr().out
    # The sweep and its resumption each put the dataset into the object store once, for all their trials (a put per
    # trial would be 4 or more); what else goes there is small.
    dataset_bytes = sum(a.nbytes for a in load_dataset(grid_configs(load_sweep(file))[0]).values())
    assert 2 * dataset_bytes <= _object_store_bytes_created() - created < 3 * dataset_bytes
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [
        "plain20-s0", "plain20-s1", "resnet20-s0", "resnet20-s1"]
    for name, (mtime, text) in finished.items():  # finished trials were not run again
        result = sweep_dir / name / "result.json"
        assert (result.stat().st_mtime_ns, result.read_text()) == (mtime, text)
        assert sorted(p.name for p in (sweep_dir / name).glob("checkpoint_*")) == checkpoints[name]
    assert {"model", "seed", "params"} <= _hparam_names(sweep_dir / "resnet20-s1")
    environment = json.loads((sweep_dir / "resnet20-s1" / "environment.json").read_text())
    assert environment["attempts"][-1]["command"] == sys.argv  # the sweep's command line, not the trial actor's

    start = time.perf_counter()
    assert cli.main(["report", str(sweep_dir)]) == 0
    report_wall = time.perf_counter() - start
    table = capsys.readouterr().out
    with open(sweep_dir / "report.csv") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"resnet20", "plain20"}
    assert all(row["seeds"] == "2" and row["unfinished"] == "" for row in rows.values())
    assert rows["resnet20"]["params"] == rows["plain20"]["params"] == "269722"
    assert float(rows["resnet20"]["paper_error"]) == 8.75 and rows["plain20"]["paper_error"] == ""
    assert "| resnet20 | 269,722 | 2 |" in table and "| 8.75 |" in table
    import matplotlib.image

    assert matplotlib.image.imread(sweep_dir / "curves.png").shape[2] in (3, 4)
    print(f"\nsweep walls: interrupted run {first_wall:.0f}s, resume {resume_wall:.0f}s, report {report_wall:.1f}s")


@pytest.mark.usefixtures("ray_local")
def test_asha_stops_a_bad_learning_rate_early(tmp_path):
    # Colour-coded classes: after epoch 1 (32 steps of 32) lr 0.01 reaches 86 % test accuracy (Intel Xeon), while
    # lr 1e-7 leaves the net at chance (10 %), so ASHA stops the bad trial at the epoch-1 rung. Not lr 0.05: its
    # weights move so fast that the BatchNorm running statistics lag, and its epoch-1 test accuracy is anywhere
    # from 10 % (Intel Xeon) to 63 % (AMD EPYC) with the same train accuracy: a tie with chance on some CPUs.
    write_parquet_cifar(tmp_path / "easy", *colour_coded_cifar(1024, seed=0), "train")
    write_parquet_cifar(tmp_path / "easy", *colour_coded_cifar(100, seed=1), "test")
    shipped = yaml.safe_load((CONFIGS / "sweep_lr_wd.yaml").read_text())
    file = _write(tmp_path / "asha.yaml", {
        "name": "asha",
        "config": {**TINY, "model": "resnet20", "schedule": {"epochs": 2, "warmup_epochs": 0, "milestones": []},
                   "optim": {"batch_size": 32}, "data": {"root": str(tmp_path / "easy")},
                   "perf": {"eval_batch_size": 100}, "run": NO_WORKER_RESTARTS},
        "grid": {"optim.lr": [0.01, 1.0e-7]},  # one trial at a time, the good lr first
        "scheduler": {"asha": {**shipped["scheduler"]["asha"], "grace_period": 1, "reduction_factor": 2}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
    })
    sweep = load_sweep(file, storage=str(tmp_path / "sweeps"))
    outcome = run_sweep(sweep)
    assert not outcome.errors
    assert outcome.finished == 1 and (Path(sweep.dir) / "resnet20-s0-lr=0.01" / "result.json").is_file()
    assert {"optim.lr", "model", "seed"} <= _hparam_names(Path(sweep.dir) / "resnet20-s0-lr=0.01")  # swept keys in HParams
    _, runs = read_runs(sweep.dir)
    assert {r.name: (r.epoch, bool(r.finished)) for r in runs} == {
        "resnet20-s0-lr=0.01": (2, True), "resnet20-s0-lr=1e-07": (1, False)}
    good, bad = (r.curve[1]["test_acc"] for r in sorted(runs, key=lambda r: r.name))
    assert good - bad >= 15, (good, bad)


@pytest.mark.usefixtures("ray_local")
def test_a_diverged_trial_is_reported_and_not_rerun_by_resume(real_cifar_small, tmp_path, capsys):
    file = _write(tmp_path / "nan.yaml", {
        "name": "nan", "config": {**TINY, "data": {**TINY["data"], "root": str(real_cifar_small)},
                                  "optim": {"batch_size": 32}},  # 4 steps: lr 1e12 overflows within the epoch
        "grid": {"optim.lr": [0.05, 1.0e12]},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    })
    args = ["sweep", "-c", str(file), "--storage", str(tmp_path / "sweeps")]
    assert cli.main(args) == 0
    assert "1/2 trials finished, 1 diverged (loss NaN/inf), 0 failed" in capsys.readouterr().out
    diverged = tmp_path / "sweeps" / "nan" / "resnet20-s0-lr=1000000000000.0"
    kept = {p: p.stat().st_mtime_ns for p in diverged.rglob("*") if p.is_file()}
    assert json.loads((diverged / "result.json").read_text())["status"] == "diverged"

    assert cli.main([*args, "--resume"]) == 0
    assert "1/2 trials finished, 1 diverged" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in diverged.rglob("*") if p.is_file()} == kept  # not trained again
    assert cli.main(["report", str(tmp_path / "sweeps" / "nan")]) == 0
    assert "Diverged (training loss NaN/inf; not counted, not rerun by --resume): resnet20-s0-lr=1000000000000.0 " \
           "(loss nan in epoch 1)" in capsys.readouterr().out


@pytest.mark.usefixtures("ray_local")
def test_a_small_recipes_sweep_selects_on_validation_and_reports_a_column_per_recipe(real_cifar_small, tmp_path,
                                                                                      capsys):
    recipes = load_sweep(CONFIGS / "sweep_recipes.yaml")
    file = _write(tmp_path / "recipes.yaml", {  # the shipped grid of recipes, on one depth, seed and tiny epoch
        "name": "recipes", "config": {**TINY, "data": {**TINY["data"], "root": str(real_cifar_small), "val_split": 100}},
        "grid": {"recipe": recipes.grid["recipe"], "model": ["resnet20"], "seed": [0]},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    })
    assert cli.main(["sweep", "-c", str(file), "--storage", str(tmp_path / "sweeps")]) == 0
    assert "3/3 trials finished" in capsys.readouterr().out
    sweep_dir = tmp_path / "sweeps" / "recipes"
    paper = json.loads((sweep_dir / "resnet20-s0-recipe=paper" / "result.json").read_text())
    assert paper["best_selected_on"] == "validation set (100 held-out training images)"
    assert 0 <= paper["best_val_acc"] <= 100 and paper["best_epoch"] == 1
    assert (sweep_dir / "resnet20-s0-recipe=paper" / "best" / "checkpoint.pt").is_file()
    assert {"val/acc", "val/loss", "test/acc"} <= _scalar_tags(sweep_dir / "resnet20-s0-recipe=paper")
    assert cli.main(["report", str(sweep_dir)]) == 0
    table = capsys.readouterr().out
    assert "| model | timm | paper | reproduction | paper (Table 6) |" in table
    assert "| resnet20 | " in table and table.count("(n=1)") == 3 and "selected on the test set" not in table


def _fake_run(sweep_dir, model, seed, test_accs, train_accs, epochs, recipe="timm"):
    """A run dir as a sweep trial leaves it: config.yaml, tb/ per-epoch accuracies, result.json once finished."""
    from torch.utils.tensorboard import SummaryWriter

    from ray_resnet.config import from_dict, save_config

    run_dir = sweep_dir / (f"{model}-s{seed}" + ("" if recipe == "timm" else f"-recipe={recipe}"))
    run_dir.mkdir(parents=True)
    save_config(from_dict({"model": model, "seed": seed, "recipe": recipe,
                           "schedule": {"epochs": epochs, "warmup_epochs": 0, "milestones": []}}),
                run_dir / "config.yaml")
    with SummaryWriter(str(run_dir / "tb")) as writer:
        for epoch, (test, train) in enumerate(zip(test_accs, train_accs), start=1):
            writer.add_scalar("test/acc", test, epoch)
            writer.add_scalar("train/acc", train, epoch)
    if len(test_accs) == epochs:
        (run_dir / "result.json").write_text(
            f'{{"epoch": {epochs}, "epochs": {epochs}, "final_test_acc": {test_accs[-1]}, "best_test_acc": 0}}')


def test_report_of_a_partial_degradation_sweep(tmp_path, capsys):
    sweep_dir = tmp_path / "degradation"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": "degradation", "grid": {"model": ["plain20", "plain56", "resnet20", "resnet56"], "seed": [0, 1]}}))
    # final test errors: plain20 10/12, plain56 15, resnet20 9/8, resnet56 7 (+ resnet56-s1 stopped at epoch 1)
    _fake_run(sweep_dir, "plain20", 0, [50, 90], [50, 95], 2)
    _fake_run(sweep_dir, "plain20", 1, [52, 88], [52, 94], 2)
    _fake_run(sweep_dir, "plain56", 0, [40, 85], [40, 90], 2)
    _fake_run(sweep_dir, "resnet20", 0, [55, 91], [55, 96], 2)
    _fake_run(sweep_dir, "resnet20", 1, [56, 92], [56, 95], 2)
    _fake_run(sweep_dir, "resnet56", 0, [60, 93], [60, 98], 2)
    _fake_run(sweep_dir, "resnet56", 1, [61], [61], 2)
    # plain56-s1 failed on an error any rerun would raise again: recorded as the trial records it, never rerun
    trial = ["model=plain56", "seed=1", "schedule.epochs=2", "schedule.warmup_epochs=0", "schedule.milestones=[]",
             "run.name=plain56-s1", f"run.storage={sweep_dir}"]
    _record_trial_error(load_config(None, trial), "cannot resume plain56-s1: no kept checkpoint")

    assert cli.main(["report", str(sweep_dir)]) == 0
    table = (sweep_dir / "report.md").read_text()
    assert "6 of 8 trials finished" in table
    assert ("Failed (an error any rerun would raise again; not counted, not rerun by --resume): plain56-s1 "
            "(cannot resume plain56-s1: no kept checkpoint).") in table
    assert "| plain20 | 269,722 | 2 | 11.00 ± 1.41 | 10.00 | — | — |" in table
    assert "| resnet20 | 269,722 | 2 | 8.50 ± 0.71 | 8.00 | 8.75 | -0.25 |" in table
    assert "| resnet56 | 853,018 | 1 | 7.00 ± — | 7.00 | 6.97 | +0.03 |" in table
    assert "resnet56-s1 (1/2 epochs)" in table
    assert "plain, depth: test / train error % — 20: 11.00 / 5.50, 56: 15.00 / 10.00 (deeper trains worse)" in table
    assert "ResNet, depth: test / train error % — 20: 8.50 / 4.50, 56: 7.00 / 2.00 (deeper trains better)" in table
    with open(sweep_dir / "report.csv") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert rows["resnet56"]["unfinished"] == "resnet56-s1 (1/2 epochs)" and rows["plain56"]["seeds"] == "1"
    assert rows["plain56"]["unfinished"] == "" and rows["plain56"]["failed"].startswith("plain56-s1 (cannot resume")
    capsys.readouterr()
    assert cli.main(["status", str(sweep_dir)]) == 0
    assert re.search(r"plain56-s1 +plain56 +timm +error +0/2 ", capsys.readouterr().out)
    import matplotlib.image

    assert matplotlib.image.imread(sweep_dir / "curves.png").shape[1] > 1000  # two panels: plain and ResNet


def test_report_of_a_recipes_sweep_has_a_column_per_recipe(tmp_path):
    sweep_dir = tmp_path / "recipes"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": "recipes", "grid": {"recipe": ["timm", "paper"], "model": ["resnet20", "resnet110"], "seed": [0, 1]}}))
    # final test errors: timm resnet20 8/10, paper resnet20 9/9, timm resnet110 6 (s1 unfinished), paper resnet110 7/8
    for recipe, model, seed, acc in [("timm", "resnet20", 0, 92), ("timm", "resnet20", 1, 90), ("paper", "resnet20", 0, 91),
                                     ("paper", "resnet20", 1, 91), ("timm", "resnet110", 0, 94), ("paper", "resnet110", 0, 93),
                                     ("paper", "resnet110", 1, 92)]:
        _fake_run(sweep_dir, model, seed, [50, acc], [50, 99], 2, recipe)
    _fake_run(sweep_dir, "resnet110", 1, [50], [50], 2, "timm")

    assert cli.main(["report", str(sweep_dir)]) == 0
    table = (sweep_dir / "report.md").read_text()
    assert "| model | timm | paper | paper (Table 6) |" in table
    assert "| resnet20 | 9.00 ± 1.00 (n=2) | 9.00 ± 0.00 (n=2) | 8.75 |" in table  # std / sqrt(n)
    assert "| resnet110 | 6.00 ± — (n=1) | 7.50 ± 0.50 (n=2) | 6.43 (6.61 ± 0.16) |" in table
    assert "| resnet20 | paper | 269,722 | 2 | 9.00 ± 0.00 |" in table  # the per-group table stays
    assert "best/ of 7 finished run(s) was selected on the test set" in table


def test_trial_names_tell_close_grid_values_apart(tmp_path):
    sweep = load_sweep(_write(tmp_path / "close.yaml", {"grid": {"optim.lr": [0.1234, 0.1235], "seed": [0]}}))
    names = [trial_name(sweep, {"optim.lr": lr, "seed": 0}, "t_00001") for lr in (0.1234, 0.1235)]
    assert names == ["resnet20-s0-lr=0.1234", "resnet20-s0-lr=0.1235"]


def test_resume_takes_a_moved_dataset_and_other_resources_but_not_another_recipe(tmp_path):
    from ray_resnet.constants import SWEEP_FILE
    from ray_resnet.io import storage
    from ray_resnet.raytrain.sweep import check_resume

    file = _write(tmp_path / "s.yaml", {"config": {**TINY, "data": {"root": str(tmp_path / "a")}},
                                        "grid": {"seed": [0, 1]}, "resources": {"cpus_per_worker": 1}})
    started = load_sweep(file, storage=str(tmp_path / "sweeps"))
    storage.write_text(storage.join(started.dir, SWEEP_FILE), yaml.safe_dump(started.as_dict(), sort_keys=False))
    moved = load_sweep(_write(tmp_path / "moved.yaml", {**yaml.safe_load(file.read_text()),
                                                         "resources": {"cpus_per_worker": 2}}),
                       extra={"data": {"root": str(tmp_path / "b")}}, name="s", storage=str(tmp_path / "sweeps"))
    check_resume(moved, resume=True)  # data.root and run.cpus_per_worker may change
    other = load_sweep(file, ["optim.lr=0.2"], storage=str(tmp_path / "sweeps"))
    with pytest.raises(SweepError, match="another recipe \\(optim.lr: None -> 0.2\\)"):
        check_resume(other, resume=True)
    regridded = load_sweep(_write(tmp_path / "s.yaml", {**yaml.safe_load(file.read_text()), "grid": {"seed": [0]}}),
                           storage=str(tmp_path / "sweeps"))
    with pytest.raises(SweepError, match="another recipe \\(grid: "):
        check_resume(regridded, resume=True)


@pytest.mark.usefixtures("ray_local")
def test_autoscaling_sweeps_name_their_concurrency(tmp_path):
    file = _write(tmp_path / "auto.yaml", {"config": {"run": {"autoscaling": True}}, "grid": {"seed": [0, 1]}})
    with pytest.raises(SweepError, match="set resources.max_concurrent_trials"):
        _max_concurrent(load_sweep(file))  # 0 GPU nodes yet: no count to give Tune (which reads 0 as no limit)
    assert _max_concurrent(load_sweep(_write(tmp_path / "auto2.yaml", {
        "config": {"run": {"autoscaling": True}}, "grid": {"seed": [0, 1]},
        "resources": {"max_concurrent_trials": 3}}))) == 3


@pytest.mark.ray
def test_an_asha_sweep_on_a_ray_without_its_dashboard_is_refused_before_any_trial(tmp_path):
    """There Ray Train never frees a stopped trial's workers, and the next trials would wait for them forever."""
    import subprocess

    write_parquet_cifar(tmp_path / "data", *colour_coded_cifar(64, seed=0), "train")
    write_parquet_cifar(tmp_path / "data", *colour_coded_cifar(16, seed=1), "test")
    file = _write(tmp_path / "asha.yaml", {
        "name": "asha", "config": {**TINY, "data": {"root": str(tmp_path / "data")}}, "grid": {"optim.lr": [0.1, 0.01]},
        "scheduler": {"asha": {"grace_period": 1}}, "resources": {"cpus_per_worker": 1}})
    sweep = ["sweep", "-c", str(file), "--storage", str(tmp_path / "sweeps")]
    script = ("import sys, ray\nfrom ray_resnet.apps import cli\n"
              "ray.init(address='local', num_cpus=2, num_gpus=0, include_dashboard=False)\n"
              f"sys.exit(cli.main({sweep!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "scheduler.asha needs Ray's State API" in done.stderr and "--include-dashboard=true" in done.stderr
    assert not list((tmp_path / "sweeps").rglob("result.json"))


@pytest.mark.usefixtures("ray_local")
def test_a_trial_whose_workers_never_get_room_fails_and_is_rerun_by_resume(real_cifar_small, tmp_path):
    """Not a deterministic error (no result.json "error"): the cluster may have room later, so --resume reruns it."""
    file = _write(tmp_path / "nofit.yaml", {
        "name": "nofit", "config": {**TINY, "data": {**TINY["data"], "root": str(real_cifar_small)},
                                    "run": {"autoscaling": True, "device": "cpu", "start_timeout_s": 5}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1000, "max_concurrent_trials": 1},
    })
    sweep = load_sweep(file, storage=str(tmp_path / "sweeps"))
    for resume in (False, True):
        outcome = run_sweep(sweep, resume=resume)
        assert outcome.finished == 0 and len(outcome.errors) == 1, outcome
        assert "run.start_timeout_s=5 s" in outcome.errors[0], outcome.errors
    (trial,) = [p for p in Path(sweep.dir).iterdir() if (p / "config.yaml").is_file()]
    assert not (trial / "result.json").exists()
    assert len(json.loads((trial / "environment.json").read_text())["attempts"]) == 2  # rerun by --resume
