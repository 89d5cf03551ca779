import pytest
import torch

from ray_resnet.models import MODEL_NAMES, PadShortcut, build_model, count_parameters

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
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


def test_kaiming_normal_init():
    torch.manual_seed(0)
    w = build_model("resnet56").layer3[0].conv2.weight  # fan_in = 64 * 3 * 3
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)


def test_bad_names_say_what_is_valid():
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("resnet30")
    with pytest.raises(ValueError, match="resnet20, resnet32"):
        build_model("vgg16")
    assert len(MODEL_NAMES) == 16
