"""Image pipelines from timm: a backbone's data config (size, interpolation, crop, mean/std) and its training
augmentation (random-resized crop, flip, RandAugment or AutoAugment), as options of a DataModule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from dcccl.errors import ConfigError

# timm's defaults for a network without a pretrained config (ImageNet statistics, bicubic, crop 0.875).
DEFAULT_DATA_CONFIG: dict[str, Any] = {"interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                                       "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@dataclass
class TrainAugmentation:
    """Random augmentation of the training images (timm's ``create_transform`` with ``is_training``).

    Args:
        scale: Random-resized crop: the range of the crop's area, as a share of the image.
        ratio: Random-resized crop: the range of its aspect ratio.
        hflip: Probability of a horizontal flip.
        auto_augment: ``rand-m9-mstd0.5`` (RandAugment), ``original`` (AutoAugment), any timm policy string,
            or ``null``.
        color_jitter: Colour jitter strength (``null``: none; timm ignores it under RandAugment).
        re_prob: Probability of random erasing.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: Optional[str] = None
    color_jitter: Optional[float] = None
    re_prob: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"augment scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 <= self.hflip <= 1 or not 0 <= self.re_prob <= 1:
            raise ConfigError(f"augment hflip and re_prob are probabilities, got {self.hflip} and {self.re_prob}")


def timm_data_config(model_name: Optional[str]) -> dict[str, Any]:
    """Interpolation, crop and statistics of ``model_name``'s pretrained config (timm's defaults for ``None``)."""
    if model_name is None:
        return dict(DEFAULT_DATA_CONFIG)
    import timm
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    if not timm.is_model(model_name):
        raise ConfigError(f"data_config names {model_name!r}, which is not a timm model: give the timm name of the "
                          "backbone whose image pipeline the data should follow")
    pretrained = get_pretrained_cfg(model_name)  # None for a model timm knows no weights of: timm's defaults then
    config = resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained is not None else {})
    return {key: config[key] for key in DEFAULT_DATA_CONFIG}


def timm_transform(image_size: int, config: dict[str, Any], normalize: bool,
                   augment: Optional[TrainAugmentation] = None) -> Callable[..., Any]:
    """timm's evaluation pipeline (resize, centre crop to ``image_size``) or, with ``augment``, its training one.

    Without ``normalize`` the images stay in [0, 1] (each network then normalises its own input).
    """
    from timm.data import create_transform

    # (timm's own normalize=False leaves uint8 tensors, for its GPU prefetcher; an identity normalisation gives
    # float images in [0, 1].)
    mean, std = (config["mean"], config["std"]) if normalize else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    common: dict[str, Any] = {"input_size": (3, image_size, image_size), "interpolation": config["interpolation"],
                              "mean": mean, "std": std}
    if augment is None:
        return create_transform(**common, is_training=False, crop_pct=config["crop_pct"],
                                crop_mode=config["crop_mode"])
    return create_transform(**common, is_training=True, scale=augment.scale, ratio=augment.ratio,
                            hflip=augment.hflip, auto_augment=augment.auto_augment,
                            color_jitter=augment.color_jitter,  # type: ignore[arg-type]  # timm reads None as off
                            re_prob=augment.re_prob)


def resize_before_crop(image_size: int, crop_pct: float) -> int:
    """The shorter side an image is resized to before its centre crop of ``image_size`` (timm's rule)."""
    return int(image_size / crop_pct) if crop_pct < 1 else image_size
