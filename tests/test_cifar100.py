"""CIFAR-100: the shipped configs, and a tiny real run (local Ray) on a 100-class fixture in torchvision's
`cifar-100-python` layout, evaluated from the same images in HuggingFace parquet form."""

import json
from pathlib import Path

import pytest
import torch

from ray_resnet.apps import cli
from ray_resnet.config import load_config
from ray_resnet.constants import NUM_CLASSES
from ray_resnet.core.checkpoint import load_checkpoint
from ray_resnet.core.models import build_model

from fixtures import random_cifar, write_parquet_cifar, write_torchvision_cifar

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_cifar100_configs_select_depth_and_100_classes(depth):
    cfg = load_config(CONFIGS / f"cifar100_resnet{depth}.yaml")
    assert (cfg.model, cfg.data.dataset) == (f"resnet{depth}", "cifar100")
    assert cfg.optim == load_config(CONFIGS / f"cifar10_resnet{depth}.yaml").optim  # only dataset and depth differ
    assert build_model(cfg.model, NUM_CLASSES[cfg.data.dataset]).linear.out_features == 100


@pytest.mark.usefixtures("torch_sees_no_gpu")  # compared with CPU results
def test_cifar100_trains_through_ray_and_evaluates_from_either_layout(ray_local, cache_dir, tmp_path, capsys):
    train, test = random_cifar(200, 100, seed=1), random_cifar(100, 100, seed=2)  # 2 / 1 images per class
    write_torchvision_cifar(tmp_path / "pickles", *train, *test, dataset="cifar100")
    write_parquet_cifar(tmp_path / "parquet", *test, "test", "cifar100")
    argv = ["train", "-c", str(CONFIGS / "cifar100_resnet20.yaml"), "--data", str(tmp_path / "pickles"),
            "--storage", str(tmp_path / "runs"), "--name", "c100"]
    sets = ["schedule.epochs=1", "schedule.warmup_epochs=0", "schedule.milestones=[]", "optim.batch_size=50", "perf.eval_batch_size=100"]
    assert cli.main(argv + [a for s in sets for a in ("--set", s)]) == 0
    run_dir = tmp_path / "runs" / "c100"
    best = load_checkpoint(run_dir)
    assert best.model["linear.weight"].shape == torch.Size([100, 64])
    assert json.loads((run_dir / "result.json").read_text())["dataset"] == "cifar100"
    capsys.readouterr()

    assert cli.main(["eval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "parquet"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (evaluated["dataset"], evaluated["count"]) == ("cifar100", 100)
    # Both evaluations run in fp32 on the same images and weights, in two processes whose thread counts may differ:
    # only float32 rounding of the logits and of the loss sum can differ; 1 image is 1 point of accuracy.
    assert evaluated["loss"] == pytest.approx(best.metrics["test_loss"], rel=1e-4)  # same images, same weights
    assert evaluated["acc"] == pytest.approx(best.metrics["test_acc"], abs=1.0)  # <= 1 borderline flip
