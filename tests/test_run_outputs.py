"""What a finished run gives its users, on a real tiny run (local Ray, real CIFAR-10 rows): TensorBoard served
over HTTP with every scalar (per epoch and per step) and the hparams session, the record of where it ran, and
eval / export round trips of its checkpoint."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
from torch import nn

from ray_resnet.apps import cli
from ray_resnet.apps.export import exported_logits, onnx_missing
from ray_resnet.core.augment import normalize
from ray_resnet.core.datasets import load_cifar
from ray_resnet.core.precision import training_precision
from ray_resnet.io.environment import cpu_model

from fixtures import FINISHED_RUN_EPOCHS

EPOCHS = FINISHED_RUN_EPOCHS
SCALAR_TAGS = {"train/loss", "train/acc", "test/loss", "test/acc", "lr"}
STEP_TAGS = {"step/train_loss", "step/lr"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A TensorBoard process; `get`/`post` its HTTP API, retrying until it answers with what `ready` wants."""

    def __init__(self, argv, log: Path, port: int):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def request(self, path, body=None, ready=lambda answer: True, timeout_s=120):
        deadline = time.monotonic() + timeout_s  # it loads event files in the background after it starts
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"tensorboard exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                data = json.dumps(body).encode() if body is not None else None  # hparams takes a JSON POST
                request = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as r:
                    answer = json.loads(r.read())
                if ready(answer):
                    return answer
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no ready answer from {self.url}{path} in {timeout_s}s: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_tensorboard_serves_every_scalar_and_the_hparams_session(finished_run, tmp_path):
    port = _free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    served = Served([str(tensorboard), "--logdir", str(finished_run), "--host", "127.0.0.1", "--port", str(port)],
                    tmp_path / "tb.log", port)
    try:
        tags = served.request("/data/plugin/scalars/tags", ready=lambda t: SCALAR_TAGS <= set(t.get("tb", {}))
                              and STEP_TAGS <= set(t.get("tb/steps", {})))
        assert set(tags) == {"tb", "tb/steps"}  # the run dir's tb/, and its step-axis scalars
        for tag in sorted(SCALAR_TAGS):
            points = served.request(f"/data/plugin/scalars/scalars?run=tb&tag={tag}")
            assert [step for _, step, _ in points] == list(range(1, EPOCHS + 1)), tag  # [wall_time, step, value]
        for tag in sorted(STEP_TAGS):
            points = served.request(f"/data/plugin/scalars/scalars?run={urllib.parse.quote('tb/steps', safe='')}"
                                    f"&tag={tag}")
            assert [step for _, step, _ in points] == [3, 6], tag
        accs = [value for _, _, value in served.request("/data/plugin/scalars/scalars?run=tb&tag=test/acc")]
        assert all(0 <= a <= 100 for a in accs)

        experiment = served.request("/data/plugin/hparams/experiment", {"experimentName": ""},
                                    ready=lambda e: e.get("hparamInfos"))
        names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"model", "depth", "lr", "seed", "batch_size", "epochs"} <= names
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"hparam/final_test_acc"}
        groups = served.request("/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN", "STATUS_RUNNING"],
            "colParams": [], "startIndex": 0, "sliceSize": 10}, ready=lambda g: g.get("sessionGroups"))
        (group,) = groups["sessionGroups"]
        assert group["hparams"]["model"] == "resnet20" and group["hparams"]["epochs"] == EPOCHS
        final = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}["hparam/final_test_acc"]
        assert final == pytest.approx(accs[-1])  # one float, stored as float32 by both: rel 1e-6 is slack
        print(f"TensorBoard run 'tb' tags: {sorted(tags['tb'])}; hparams: {sorted(names)}; "
              f"session metrics: {sorted(m['name']['tag'] for m in group['metricValues'])}")
    finally:
        served.stop()


def test_ray_resnet_tensorboard_serves_a_run_dir_and_refuses_an_empty_one(finished_run, tmp_path, capsys):
    port = _free_port()
    served = Served([sys.executable, "-m", "ray_resnet", "tensorboard", str(finished_run), "--port", str(port)],
                    tmp_path / "cli.log", port)
    try:
        served.request("/data/plugin/scalars/tags", ready=lambda t: SCALAR_TAGS <= set(t.get("tb", {})))
    finally:
        served.stop()
    assert cli.main(["tensorboard", str(tmp_path)]) == 2
    assert "no TensorBoard event files under" in capsys.readouterr().err


def test_the_run_dir_records_where_it_ran(finished_run):
    (attempt,) = json.loads((finished_run / "environment.json").read_text())["attempts"]
    assert attempt["command"] == sys.argv and attempt["num_workers"] == 1
    assert (attempt["torch"], attempt["ray"]) == (torch.__version__, ray.__version__)
    assert attempt["driver"]["cpu"] == cpu_model() and attempt["driver"]["cpus"] == os.cpu_count()
    (group,) = attempt["worker_groups"]
    assert (group["workers"], group["gpus"]) == (1, 0)
    (rank,) = group["ranks"]
    assert rank["rank"] == 0 and rank["device"] == "cpu" and rank["gpu"] is None and rank["cpu"] == cpu_model()
    assert rank["threads"] == 2  # the local Ray's 2 CPUs, all for the one worker
    assert rank["precision"] == training_precision(torch.device("cpu"), "auto")


def _eval_json(capsys, *args):
    assert cli.main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.usefixtures("torch_sees_no_gpu")  # compared with CPU results
def test_checkpoint_exports_and_weights_files_evaluate_the_same(finished_run, real_cifar_small, tmp_path, capsys):
    reference = _eval_json(capsys, "--checkpoint", str(finished_run))
    accuracies = {"eval --checkpoint": reference["acc"]}

    exported = tmp_path / "r20.pt"
    assert cli.main(["export", "--checkpoint", str(finished_run), "--format", "state_dict",
                     "--output", str(exported)]) == 0
    plain = _eval_json(capsys, "--weights", str(exported), "--model", "resnet20", "--data", str(real_cifar_small))
    wrapped = tmp_path / "akamaster.th"  # what their trainer writes: DataParallel keys under 'state_dict'
    model = torch.hub.load(str(Path(__file__).resolve().parents[1]), "resnet20", source="local", weights=str(exported))
    torch.save({"state_dict": nn.DataParallel(model).state_dict(), "best_prec1": 0.0}, wrapped)
    akamaster = _eval_json(capsys, "--weights", str(wrapped), "--model", "resnet20", "--data", str(real_cifar_small))
    accuracies.update({"export state_dict -> eval --weights": plain["acc"],
                       "DataParallel {'state_dict'} file -> eval --weights": akamaster["acc"]})
    assert plain["acc"] == akamaster["acc"] == reference["acc"]
    # --checkpoint evaluates in chunks of the run's perf.eval_batch_size (200), --weights in one of 500: the float32
    # loss sums add up in another order (~1e-7)
    assert plain["loss"] == akamaster["loss"] == pytest.approx(reference["loss"], rel=1e-6)  # the same weights

    images, labels = load_cifar(real_cifar_small, "test", cache_dir=os.environ["RAY_RESNET_CACHE"])
    for fmt in ("torchscript", "onnx"):
        if fmt == "onnx" and onnx_missing():
            continue  # test_export.py reports the skip and its reason
        path = tmp_path / f"r20.{fmt}"
        assert cli.main(["export", "--checkpoint", str(finished_run), "--format", fmt, "--output", str(path)]) == 0
        logits = exported_logits(path, fmt, normalize(images))
        accuracies[f"export {fmt} -> reload"] = (logits.argmax(1) == labels).float().mean().item() * 100
        # ONNX Runtime's and TorchScript's float32 logits round otherwise than torch's eval: a borderline top-1 may
        # flip; 1 image of 500 is 0.2 points
        assert accuracies[f"export {fmt} -> reload"] == pytest.approx(reference["acc"], abs=0.21)  # <= 1 of 500
    with capsys.disabled():  # the numbers the closing note reports (pytest -s shows them)
        print("\nround-trip top-1 on", reference["count"], "test images:", json.dumps(accuracies))
