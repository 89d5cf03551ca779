"""CIFAR ResNets of He et al. (2015), trained with Ray Train and swept with Ray Tune."""

from .timm_models import register_when_timm_is_imported

register_when_timm_is_imported()  # costs nothing until timm itself is imported
