"""torch.hub (`hubconf.py`, loaded with source="local") and timm (`cifar_*` names) give our models."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ray_resnet.constants import MODEL_NAMES
from ray_resnet.core.models import build_model, count_parameters

from fixtures import trained_like

REPO = Path(__file__).resolve().parents[1]


def _akamaster_file(model, path):
    torch.save({"state_dict": nn.DataParallel(model).state_dict(), "best_prec1": 92.0}, path)
    return path


def test_torch_hub_loads_every_model_from_the_repo(tmp_path):
    model = torch.hub.load(str(REPO), "resnet32", source="local", pretrained=False)
    assert type(model).__name__ == "CifarResNet" and count_parameters(model) == 464_154
    wide = torch.hub.load(str(REPO), "resnet56", source="local", num_classes=100)
    assert wide.linear.out_features == 100
    trained = trained_like("resnet20")
    loaded = torch.hub.load(str(REPO), "resnet20", source="local",
                            weights=str(_akamaster_file(trained, tmp_path / "r20.th"))).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    with pytest.raises(ValueError, match="no resnet32 weights are published at a URL; pass weights=FILE"):
        torch.hub.load(str(REPO), "resnet32", source="local", pretrained=True)


def test_importing_ray_resnet_does_not_import_timm_and_ray_resnet_timm_registers_the_models():
    pytest.importorskip("timm")
    script = (
        "import sys, ray_resnet, ray_resnet.core.models; assert 'timm' not in sys.modules\n"
        "import ray_resnet.timm, timm; m = timm.create_model('cifar_resnet32', num_classes=100)\n"
        "print(type(m).__name__, m.linear.out_features, len(timm.list_models('cifar_*')))\n"
        "print(timm.data.resolve_model_data_config(m)['input_size'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [f"CifarResNet 100 {len(MODEL_NAMES)}", "(3, 32, 32)"]


def test_timm_creates_our_models_and_reads_akamaster_files(tmp_path):
    timm = pytest.importorskip("timm")
    from ray_resnet.timm import register_with_timm

    register_with_timm()  # again: a no-op
    model = timm.create_model("cifar_resnet20")
    assert count_parameters(model) == count_parameters(build_model("resnet20"))
    trained = trained_like("resnet20", seed=1)
    from_file = timm.create_model("cifar_resnet20", checkpoint_path=str(_akamaster_file(trained, tmp_path / "w.th")))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_file.eval()(x), trained(x))
    assert timm.models.model_entrypoint("cifar_resnet20").__module__ == "ray_resnet.timm"
    assert timm.models.model_entrypoint("resnet26").__module__ == "timm.models.resnet"  # timm's own: untouched
    with pytest.raises(ValueError, match="takes only num_classes"):
        timm.create_model("cifar_resnet20", drop_rate=0.1)
