"""torch.hub entry points: `torch.hub.load("<owner>/ray-resnet", "resnet32", pretrained=False, num_classes=10)`.

One entry per model of `ray_resnet.core.models` (`torch.hub.list` shows them). No weights are published at a URL;
`weights=FILE` loads a local file strictly: a state dict, a ray-resnet checkpoint.pt, or a `{'state_dict': ...}`
file from akamaster/pytorch_resnet_cifar10 (`module.` prefixes are removed).
"""

dependencies = ["torch"]

from ray_resnet.constants import MODEL_NAMES  # noqa: E402  (torch.hub reads `dependencies` first)
from ray_resnet.core.models import build_model  # noqa: E402
from ray_resnet.core.weights import load_weights, read_weights  # noqa: E402


def _entry(name):
    def entry(pretrained: bool = False, num_classes: int = 10, weights: str | None = None):
        if pretrained:
            raise ValueError(f"no {name} weights are published at a URL; pass weights=FILE (a state dict, "
                             "a ray-resnet checkpoint.pt or an akamaster .th file) instead of pretrained=True")
        model = build_model(name, num_classes)
        if weights:
            load_weights(model, read_weights(weights)[0], f"the weights in {weights}")
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"CIFAR {name} (He et al. 2015, sec. 4.2); num_classes 10 or 100; weights: a local file to load."
    return entry


globals().update({name: _entry(name) for name in MODEL_NAMES})
