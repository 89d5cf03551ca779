"""timm integration: `timm.create_model("cifar_resnet32", num_classes=100)` once `ray_resnet` is imported.

The names carry a `cifar_` prefix because timm has its own (ImageNet) `resnet*` models. timm is an optional
extra (`pip install ray-resnet[timm]`) and takes about 2 s to import (measured on top of torch), so importing
ray_resnet never imports it: if timm is already imported the models are registered at once, otherwise a
finder on `sys.meta_path` registers them right after timm's own import finishes. Ray workers, which import
ray_resnet but never timm, pay nothing.
"""

from __future__ import annotations

import importlib.util
import sys

from .constants import IMAGENET_MEAN, IMAGENET_STD

TIMM_PREFIX = "cifar_"
default_cfgs: dict = {}  # filled on registration; timm's register_model reads it from this module


def _entrypoint(name: str):
    def create_model(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                     num_classes: int = 10, in_chans: int = 3, **kwargs):
        from timm.models import resolve_pretrained_cfg

        from .models import build_model

        if pretrained:
            raise ValueError(f"no published weights for {TIMM_PREFIX}{name}; load a file instead with "
                             f"timm.create_model(..., checkpoint_path=FILE) or ray_resnet.weights.load_weights")
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
    """Register every model of ray_resnet.models with timm (imports timm)."""
    from timm.models import generate_default_cfgs, is_model, register_model

    from .models import MODEL_NAMES

    default_cfgs.update(generate_default_cfgs({
        TIMM_PREFIX + name: {"input_size": (3, 32, 32), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 10,
                             "first_conv": "conv1", "classifier": "linear", "crop_pct": 1.0}
        for name in MODEL_NAMES
    }))
    for name in MODEL_NAMES:
        if not is_model(TIMM_PREFIX + name):
            register_model(_entrypoint(name))


class _RegisterAfterExec:  # a Loader (duck-typed: importlib.abc alone costs ~10 ms to import)
    """timm's own loader, plus registration once the `timm` package has finished executing."""

    def __init__(self, loader, hook):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if self.hook in sys.meta_path:  # timm is being imported for real: the hook's work is done
            sys.meta_path.remove(self.hook)
        self.loader.exec_module(module)
        register_with_timm()

    def __getattr__(self, name):  # get_data, get_resource_reader, ...: timm's loader answers
        return getattr(self.loader, name)


class _TimmImportHook:  # a MetaPathFinder
    """Wraps timm's loader each time timm is looked up; stays on sys.meta_path until timm is really imported
    (a bare `importlib.util.find_spec("timm")` imports nothing)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        for finder in sys.meta_path:  # the real finders locate timm
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterExec(spec.loader, self)
                return spec
        return None


def register_when_timm_is_imported() -> None:
    if "timm" in sys.modules:
        register_with_timm()
    elif importlib.util.find_spec("timm") is not None:
        sys.meta_path.insert(0, _TimmImportHook())
