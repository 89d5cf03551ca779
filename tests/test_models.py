import pytest
import torch

from ray_resnet.constants import MODEL_NAMES
from ray_resnet.core.models import PadShortcut, build_model, count_parameters

# He et al. 2015, Table 6 (CIFAR-10): the parameter counts of the option-A nets.
PAPER_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
                "resnet110": 1_727_962, "resnet1202": 19_421_274}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    assert count_parameters(build_model(name)) == PAPER_PARAMS[name]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_nets_have_the_resnet_count_and_option_b_adds_two_projections(depth):
    base = count_parameters(build_model(f"resnet{depth}"))
    assert count_parameters(build_model(f"plain{depth}")) == base
    # option B: 1x1 conv + BN at the two stage transitions (16->32, 32->64)
    assert count_parameters(build_model(f"resnet{depth}b")) == base + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_option_a_shortcut_has_no_parameters_and_pads_zeros_evenly():
    model = build_model("resnet20")
    shortcuts = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(shortcuts) == 2
    assert all(sum(p.numel() for p in m.parameters()) == 0 for m in shortcuts)
    x = torch.randn(2, 16, 32, 32)
    y = shortcuts[0](x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


@pytest.mark.parametrize("name", ["resnet20", "resnet20b", "plain20"])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name, num_classes):
    model = build_model(name, num_classes=num_classes).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, num_classes)


def test_reference_module_names_for_published_state_dicts():
    keys = list(build_model("resnet20").state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"]
    assert "layer1.0.conv1.weight" in keys and "layer3.2.bn2.running_var" in keys
    assert keys[-2:] == ["linear.weight", "linear.bias"]
    assert not any("shortcut" in k for k in keys)


def test_state_dict_round_trip_gives_same_outputs():
    torch.manual_seed(0)
    a, b = build_model("resnet32").eval(), build_model("resnet32").eval()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))  # other random weights: far outside allclose's defaults
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


def test_kaiming_normal_init():
    torch.manual_seed(0)
    w = build_model("resnet56").layer3[0].conv2.weight  # fan_in = 64 * 3 * 3
    # statistical: the std of 64 * 64 * 9 = 36,864 seeded draws has a standard error of 0.37 % (5 % is 13 of them)
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)


def test_bad_names_say_what_is_valid():
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("resnet30")
    with pytest.raises(ValueError, match="resnet20, resnet32"):
        build_model("vgg16")
    assert len(MODEL_NAMES) == 16


# --- The reference reproduction (github.com/akamaster/pytorch_resnet_cifar10, resnet.py), as published,
# so a state dict saved from it must load strictly into ours and give the same outputs.
class _LambdaLayer(torch.nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class _RefBlock(torch.nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        F = torch.nn.functional
        self.conv1 = torch.nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))

    def forward(self, x):
        F = torch.nn.functional
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class _RefResNet(torch.nn.Module):
    def __init__(self, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = torch.nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks, stride=1)
        self.layer2 = self._make_layer(32, num_blocks, stride=2)
        self.layer3 = self._make_layer(64, num_blocks, stride=2)
        self.linear = torch.nn.Linear(64, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_RefBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return torch.nn.Sequential(*layers)

    def forward(self, x):
        F = torch.nn.functional
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


@pytest.mark.parametrize("name, blocks", [("resnet20", 3), ("resnet56", 9)])
def test_reference_reproduction_state_dicts_load_strictly_and_agree(name, blocks):
    torch.manual_seed(0)
    reference = _RefResNet(blocks)
    reference.train()
    for _ in range(2):  # non-trivial BN running statistics
        reference(torch.randn(16, 3, 32, 32))
    reference.eval()
    ours = build_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)  # pooling kernels round differently
