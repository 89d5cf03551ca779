"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (sqlite store, local artifact root), read back through
MLflow's own client. The killed-driver resume is in test_faults.py."""

import json
import os
import threading
import time

import pytest
import torch
import yaml

from ray_resnet.apps import cli
from ray_resnet.core.checkpoint import load_checkpoint
from ray_resnet.core.precision import training_precision

from mlflow_server import MlflowServer
from s3_server import free_port

SETS = ["data.train_subset=256", "data.test_subset=200", "optim.batch_size=64", "schedule.warmup_epochs=0",
        "schedule.milestones=[]", "optim.lr=0.05", "perf.eval_batch_size=200", "run.log_every_steps=2",
        "schedule.epochs=2"]
STEPS_PER_EPOCH = 4  # 256 images / 64


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def _train(root, storage, name, *sets):
    return ["train", "--data", str(root), "--storage", str(storage), "--name", name,
            *[a for s in [*SETS, *sets] for a in ("--set", s)]]


def _runs(server, experiment):
    client = server.client()
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time"]) if found else []


@pytest.mark.usefixtures("ray_local")
def test_a_run_logs_config_metrics_tags_files_and_best_model_and_a_longer_rerun_continues_it(
        real_cifar_small, tmp_path, mlflow_server):
    import mlflow.pytorch

    args = _train(real_cifar_small, tmp_path, "tracked", f"run.mlflow={mlflow_server.url}",
                  "run.mlflow_experiment=single")
    assert cli.main(args) == 0
    assert "MLFLOW_TRACKING_URI" not in os.environ  # tracking stays this run's, not the process's
    (run,) = _runs(mlflow_server, "single")
    run_id, client = run.info.run_id, mlflow_server.client()
    run_dir = tmp_path / "tracked"
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run_id
    assert (run.info.run_name, run.info.status) == ("tracked", "FINISHED")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["model"] == "resnet20"
    assert run.data.params["data.root"] == saved["data"]["root"]  # the resolved config, dotted
    assert {"model": "resnet20", "recipe": saved["recipe"], "dataset": "cifar10", "seed": "0", "workers": "1",
            "precision": training_precision(torch.device("cpu"), "auto"), "device": "cpu"}.items() \
        <= run.data.tags.items()
    result = json.loads((run_dir / "result.json").read_text())
    test_acc = client.get_metric_history(run_id, "test/acc")
    assert [m.step for m in test_acc] == [1, 2] and test_acc[-1].value == pytest.approx(result["final_test_acc"])
    assert [m.step for m in client.get_metric_history(run_id, "step/lr")] == list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))
    assert {"result.json", "config.yaml", "best_model", "best_state_dict.pt"} <= \
        {a.path for a in client.list_artifacts(run_id)}
    model = mlflow.pytorch.load_model(client.download_artifacts(run_id, "best_model", str(tmp_path)))
    best = load_checkpoint(run_dir / "best").model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())

    assert cli.main([*args, "--set", "schedule.epochs=3"]) == 0  # trains on: the same MLflow run, epoch 3 added
    (again,) = _runs(mlflow_server, "single")
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "test/acc")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "step/lr")] == list(range(2, 3 * STEPS_PER_EPOCH + 1, 2))


def test_a_tracking_server_that_is_down_is_one_line_before_anything_runs(real_cifar_small, tmp_path, capsys):
    down = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    assert cli.main(_train(real_cifar_small, tmp_path, "down", f"run.mlflow={down}")) == 2
    seconds = time.perf_counter() - start
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"MLflow tracking server {down} cannot be used" in line and "unset them" in line
    assert not (tmp_path / "down" / "config.yaml").exists() and seconds < 30, seconds


@pytest.mark.usefixtures("ray_local")
def test_a_server_that_stops_mid_run_does_not_stop_the_training(real_cifar_small, tmp_path, capsys):
    server = MlflowServer(tmp_path / "server")
    run_dir = tmp_path / "runs" / "flaky"
    try:
        def stop_once_the_run_is_open():  # the driver wrote mlflow.json before Ray started: every log call fails
            while not (run_dir / "mlflow.json").exists():
                time.sleep(0.05)
            server.stop()

        threading.Thread(target=stop_once_the_run_is_open, daemon=True).start()
        assert cli.main(_train(real_cifar_small, tmp_path / "runs", "flaky", f"run.mlflow={server.url}")) == 0
        output = capsys.readouterr().out
    finally:
        server.stop()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "finished"
    assert "warning: MLflow logging failed" in output and "training goes on" in output
    assert "could not be completed" in output  # the end: its status and files wait in the run dir
    restarted = MlflowServer(tmp_path / "server", port=server.port)  # the same store: the run, opened, is there
    try:
        run = restarted.client().get_run(json.loads((run_dir / "mlflow.json").read_text())["run_id"])
        assert run.info.status == "RUNNING" and run.data.params["optim.lr"] == "0.05" and not run.data.metrics
    finally:
        restarted.stop()


@pytest.mark.usefixtures("ray_local")
def test_a_sweep_is_a_parent_run_with_a_child_run_per_trial(real_cifar_small, tmp_path, mlflow_server, capsys):
    sweep_file = tmp_path / "lr.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "lr", "config": {"data": {"train_subset": 128, "test_subset": 64}, "optim": {"batch_size": 64},
                                 "schedule": {"epochs": 1, "warmup_epochs": 0, "milestones": []},
                                 "perf": {"eval_batch_size": 64},
                                 "run": {"mlflow": mlflow_server.url, "mlflow_experiment": "sweeps"}},
        "grid": {"optim.lr": [0.05, 0.1]}, "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}}))
    assert cli.main(["sweep", "-c", str(sweep_file), "--data", str(real_cifar_small),
                     "--storage", str(tmp_path / "sweeps")]) == 0
    assert "2/2 trials finished" in capsys.readouterr().out
    runs = _runs(mlflow_server, "sweeps")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "lr" and parent.info.status == "FINISHED" and parent.data.params["grid.optim.lr"]
    assert sorted((c.info.run_name, c.data.params["optim.lr"], c.info.status) for c in children) == [
        ("resnet20-s0-lr=0.05", "0.05", "FINISHED"), ("resnet20-s0-lr=0.1", "0.1", "FINISHED")]
    for child in children:  # each trial's epoch in its own run
        assert [m.step for m in mlflow_server.client().get_metric_history(child.info.run_id, "test/acc")] == [1]
