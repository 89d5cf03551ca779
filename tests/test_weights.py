"""Weights files users have: plain state dicts, our checkpoints, akamaster's DataParallel files; strict loading;
`ray-resnet eval --weights` on a fixture dataset written by the test."""

import json
import os

import pytest
import torch
from torch import nn

from ray_resnet.apps import cli
from ray_resnet.config import Config, to_dict
from ray_resnet.core.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from ray_resnet.core.models import build_model
from ray_resnet.core.steps import LabeledImages, StepSettings, evaluate
from ray_resnet.core.weights import load_weights, model_from_weights, read_weights
from ray_resnet.errors import CheckpointError, WeightsError

from fixtures import own_lines, random_cifar, trained_like, write_parquet_cifar


def save_as(model, fmt, path):
    """Write `model` the way each kind of user file is written."""
    if fmt == "plain":
        torch.save(model.state_dict(), path)
    elif fmt == "akamaster":  # their trainer: torch.save({'state_dict': DataParallel(model).state_dict(), ...})
        torch.save({"state_dict": nn.DataParallel(model).state_dict(), "best_prec1": torch.tensor(91.73)}, path)
    elif fmt == "checkpoint":
        cfg = to_dict(Config(model="resnet20"))
        path = save_checkpoint(CheckpointState(model.state_dict(), cfg, 7), path.parent / path.stem)
    return path


@pytest.mark.parametrize("fmt", ["plain", "akamaster", "checkpoint"])
def test_every_format_loads_to_the_same_logits(tmp_path, fmt):
    model = trained_like()
    path = save_as(model, fmt, tmp_path / "w.th")
    if fmt == "akamaster":
        assert all(k.startswith("module.") for k in torch.load(path, weights_only=True)["state_dict"])
    loaded, info = model_from_weights(path, "resnet20")
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert info.model == "resnet20" and info.dataset == "cifar10"
    if fmt == "checkpoint":  # our checkpoint names its model: --model may be left out
        assert model_from_weights(path)[1].epoch == 7


def test_a_file_saved_before_torch_041_without_bn_step_counters_loads(tmp_path):
    model = trained_like()
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in old.items()}}, tmp_path / "old.th")
    loaded, _ = model_from_weights(tmp_path / "old.th", "resnet20")
    assert torch.equal(loaded.state_dict()["linear.weight"], model.state_dict()["linear.weight"])


def test_a_wrong_key_is_an_error_listing_it_and_nothing_is_loaded(tmp_path):
    state = trained_like().state_dict()
    state["bn1.gamma"] = state.pop("bn1.weight")
    target = build_model("resnet20")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match=r"missing keys: bn1\.weight; unexpected keys: bn1\.gamma\. Nothing was"):
        load_weights(target, state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_a_shape_mismatch_inside_the_same_depth_lists_both_shapes():
    state = trained_like().state_dict()
    state["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    with pytest.raises(WeightsError, match=r"wrong shapes \(file vs model\): conv1\.weight \[16, 3, 5, 5\] vs "
                                           r"\[16, 3, 3, 3\]"):
        load_weights(build_model("resnet20"), state)


@pytest.mark.parametrize("saved, asked, pattern", [
    (("resnet56", 10), ("resnet20", 10), r"of depth 56, 10 classes .* has depth 20, 10 classes"),
    (("resnet20", 100), ("resnet20", 10), r"depth 20, 100 classes \(linear\.weight \[100, 64\]\).*"
                                          r"depth 20, 10 classes \(linear\.weight \[10, 64\]\)"),
])
def test_another_depth_or_class_count_names_both_shapes(tmp_path, saved, asked, pattern):
    save_as(build_model(*saved), "akamaster", tmp_path / "w.th")
    with pytest.raises(WeightsError, match=pattern):
        model_from_weights(tmp_path / "w.th", asked[0], "cifar10" if asked[1] == 10 else "cifar100")


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_files_that_are_not_weights_are_refused_without_running_their_code(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"notes.txt is not a torch weights file \(Unsupported operand"):
        read_weights(tmp_path / "notes.txt")
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": _RunsCodeWhenUnpickled(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"objects besides tensors \(Unsupported global: GLOBAL io.open\); they are"):
        read_weights(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"lr": 0.1}, tmp_path / "hparams.pt")
    with pytest.raises(WeightsError, match=r"holds no state dict \(found \['lr'\]\)"):
        read_weights(tmp_path / "hparams.pt")
    with pytest.raises(WeightsError, match="not found"):
        read_weights(tmp_path / "missing.pt")


@pytest.fixture
def test_split(tmp_path, cache_dir):
    images, labels = random_cifar(64, seed=3)
    write_parquet_cifar(tmp_path / "data", images, labels, "test")
    return tmp_path / "data", images, labels


@pytest.mark.usefixtures("torch_sees_no_gpu")  # compared with CPU results
def test_eval_weights_prints_accuracy_loss_and_speed_for_every_format(tmp_path, test_split, capsys):
    root, images, labels = test_split
    model = trained_like()
    expected = evaluate(model, LabeledImages(images, labels), settings=StepSettings(channels_last=False))
    results = []
    for fmt in ("plain", "akamaster", "checkpoint"):
        path = save_as(model, fmt, tmp_path / f"{fmt}.th")
        assert cli.main(["eval", "--weights", str(path), "--model", "resnet20", "--data", str(root), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert [r["acc"] for r in results] == [expected["acc"]] * 3
    # expected ran contiguous, the CLI channels_last: float32 kernels that may sum in another order (seen: equal)
    assert all(r["count"] == 64 and r["loss"] == pytest.approx(expected["loss"], rel=1e-5) for r in results)
    assert results[1]["format"] == "{'state_dict': ...} wrapper" and results[2]["epoch"] == 7

    akamaster = str(tmp_path / "akamaster.th")
    assert cli.main(["eval", "--weights", akamaster, "--model", "resnet20", "--data", str(root)]) == 0
    line = capsys.readouterr().out
    assert f"on 64 cifar10 test images: top-1 {expected['acc']:.2f}%, loss " in line and "img/s" in line


def test_eval_weights_bad_input_is_one_line_exit_2(tmp_path, test_split, capsys):
    root = str(test_split[0])
    save_as(build_model("resnet56"), "akamaster", tmp_path / "r56.th")
    cases = [
        (["--weights", str(tmp_path / "r56.th"), "--model", "resnet20", "--data", root], "depth 56, 10 classes"),
        (["--weights", str(save_as(build_model("resnet20"), "plain", tmp_path / "p.pt")), "--data", root],
         "does not name its model: pass --model"),
        (["--weights", str(tmp_path / "r56.th"), "--model", "resnet56"], "pass --data DIR"),
    ]
    for args, message in cases:
        assert cli.main(["eval", *args]) == 2
        err = own_lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("ray-resnet: error: ") and message in err[0]



class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_never_unpickle_code(tmp_path):
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": {}, "payload": evil}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*not a ray-resnet checkpoint"):
        load_checkpoint(tmp_path)
    assert not evil.marker.exists()


def test_prefixes_of_nested_wrappers_are_all_removed(tmp_path):
    model = trained_like()
    state = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}  # torch.compile(DDP(model))
    torch.save(state, tmp_path / "compiled-ddp.pt")
    loaded, _ = model_from_weights(tmp_path / "compiled-ddp.pt", "resnet20")
    assert torch.equal(loaded.state_dict()["linear.weight"], model.state_dict()["linear.weight"])
