"""Backbones: a registry of custom networks, timm as the fallback, and specs that rebuild them."""

from dcccl.backbones.head import ClassifierHeadMixin
from dcccl.backbones.registry import BackboneNotFoundError, build_backbone, list_backbones, register_backbone
from dcccl.backbones.small_cnn import SmallCNN
from dcccl.backbones.spec import BackboneSpec

__all__ = [
    "BackboneNotFoundError",
    "BackboneSpec",
    "ClassifierHeadMixin",
    "SmallCNN",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]

from dcccl import split as _split  # noqa: E402,F401  (registers the "split" backbone)
