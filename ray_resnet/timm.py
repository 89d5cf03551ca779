"""timm integration: `import ray_resnet.timm` registers every model with timm, so that
`timm.create_model("cifar_resnet32", num_classes=100)` builds it.

The names carry a `cifar_` prefix because timm has its own (ImageNet) `resnet*` models. timm is an optional
extra (`pip install ray-resnet[timm]`) and takes about 2 s to import (measured on top of torch), so only this
module imports it: `import ray_resnet` alone never does (Ray workers pay nothing).
"""

from __future__ import annotations

from ray_resnet.constants import IMAGENET_MEAN, IMAGENET_STD

TIMM_PREFIX = "cifar_"
default_cfgs: dict = {}  # filled on registration; timm's register_model reads it from this module


def _entrypoint(name: str):
    def create_model(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                     num_classes: int = 10, in_chans: int = 3, **kwargs):
        from timm.models import resolve_pretrained_cfg

        from ray_resnet.core.models import build_model

        if pretrained:
            raise ValueError(f"no published weights for {TIMM_PREFIX}{name}; load a file instead with "
                             f"timm.create_model(..., checkpoint_path=FILE) or ray_resnet.core.weights.load_weights")
        kwargs.pop("cache_dir", None)  # timm passes it to every model; there is nothing to download
        if in_chans != 3 or kwargs:
            raise ValueError(f"{TIMM_PREFIX}{name} takes only num_classes (3-channel 32x32 images); got "
                             f"{dict(kwargs, **({'in_chans': in_chans} if in_chans != 3 else {}))}")
        model = build_model(name, num_classes)
        cfg = resolve_pretrained_cfg(TIMM_PREFIX + name, pretrained_cfg, pretrained_cfg_overlay).to_dict()
        model.pretrained_cfg = dict(cfg, num_classes=num_classes)  # timm.data reads input size, mean, std here
        model.num_classes = num_classes
        return model

    create_model.__name__ = create_model.__qualname__ = TIMM_PREFIX + name  # timm registers under __name__
    create_model.__module__ = __name__
    return create_model


def register_with_timm() -> None:
    """Register every model of ray_resnet.core.models with timm (imports timm)."""
    from timm.models import generate_default_cfgs, is_model, register_model

    from ray_resnet.constants import MODEL_NAMES

    default_cfgs.update(generate_default_cfgs({
        TIMM_PREFIX + name: {"input_size": (3, 32, 32), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 10,
                             "first_conv": "conv1", "classifier": "linear", "crop_pct": 1.0}
        for name in MODEL_NAMES
    }))
    for name in MODEL_NAMES:
        if not is_model(TIMM_PREFIX + name):
            register_model(_entrypoint(name))


register_with_timm()
