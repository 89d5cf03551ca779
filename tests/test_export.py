"""`ray-resnet export`: each format reloads on its own (torch.load / torch.jit.load / ONNX Runtime) and gives the
checkpoint's logits on a test batch."""

import pytest
import torch

from ray_resnet.apps import cli
from ray_resnet.apps.export import onnx_missing
from ray_resnet.config import Config, to_dict
from ray_resnet.core.augment import normalize
from ray_resnet.core.checkpoint import CheckpointState, save_checkpoint

from fixtures import random_cifar, trained_like, write_parquet_cifar


@pytest.fixture
def checkpoint_and_batch(tmp_path, cache_dir):
    images, labels = random_cifar(32, seed=5)
    write_parquet_cifar(tmp_path / "data", images, labels, "test")
    model = trained_like("resnet20")
    cfg = to_dict(Config(model="resnet20"))
    cfg["data"]["root"] = str(tmp_path / "data")
    save_checkpoint(CheckpointState(model.state_dict(), cfg, 3), tmp_path / "run" / "best")
    return tmp_path / "run", model, normalize(images)


def _reload(path, fmt):
    """Each file as a user without ray-resnet would load it."""
    if fmt == "state_dict":
        from ray_resnet.core.models import build_model

        model = build_model("resnet20")
        model.load_state_dict(torch.load(path, weights_only=True))
        return lambda x: model.eval()(x)
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # documented in export.py
@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "onnx"])
def test_export_reloads_to_the_checkpoints_logits(checkpoint_and_batch, tmp_path, fmt, capsys):
    if fmt == "onnx" and onnx_missing():
        pytest.skip(f"onnx export needs {', '.join(onnx_missing())} (pip install 'ray-resnet[export]')")
    run_dir, model, batch = checkpoint_and_batch
    out = tmp_path / f"model.{fmt}"
    assert cli.main(["export", "--checkpoint", str(run_dir), "--format", fmt, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} ({fmt}" in printed and "the first 32 cifar10 test images" in printed
    assert "same top-1 on 32/32" in printed
    with torch.no_grad():
        expected, got = model(batch), _reload(out, fmt)(batch[:7])  # another batch size than the export's
    # float32: the reloaded file runs other kernels (ONNX Runtime's, TorchScript's) on 7 images, the model on 32;
    # seen: 7.6e-6 (ONNX, AMD EPYC) on logits up to 25
    torch.testing.assert_close(got, expected[:7], rtol=1e-4, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("model.")] == [out.name]  # one file, no .data


def test_export_never_overwrites_and_names_missing_packages(checkpoint_and_batch, tmp_path, capsys):
    run_dir = checkpoint_and_batch[0]
    out = tmp_path / "taken.pt"
    out.write_bytes(b"an earlier export")
    assert cli.main(["export", "--checkpoint", str(run_dir), "--format", "state_dict", "--output", str(out)]) == 2
    assert "already exists; pass another --output" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier export"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--format", "onnx"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
