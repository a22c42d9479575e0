"""Backbones: a registry of custom networks, timm as the fallback, and specs that rebuild them."""

from dcccl.backbones.builders import BackboneNotFoundError, build_backbone, list_backbones, register_backbone
from dcccl.backbones.classifier_head import ClassifierHeadMixin
from dcccl.backbones.small_cnn import SmallCNN
from dcccl.backbones.spec import BackboneSpec
from dcccl.backbones.split import SplitSpec

__all__ = [
    "BackboneNotFoundError",
    "BackboneSpec",
    "ClassifierHeadMixin",
    "SmallCNN",
    "SplitSpec",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]
