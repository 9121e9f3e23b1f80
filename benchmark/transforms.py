"""Image transforms as the reference toolbox builds them for the official configs.

Train: RandomResizedCrop(SIZE, scale=RRCROP_SCALE, ratio=(3/4, 4/3)) -> RandomHorizontalFlip
-> ToTensor -> Normalize (no resize first: a crop is present).  Test (val and test):
Resize(shorter side to SIZE) -> CenterCrop(SIZE) -> ToTensor -> Normalize, which is
CLIP's own preprocessing.  Images are opened with PIL and converted to RGB.
"""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from yacs.config import CfgNode as CN

_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
KNOWN = ("random_resized_crop", "random_flip", "normalize", "center_crop", "random_crop")


def _interpolation(cfg: CN) -> InterpolationMode:
    name = str(cfg.INPUT.INTERPOLATION).lower()
    if name not in _INTERPOLATION:
        raise ValueError(f"INPUT.INTERPOLATION '{cfg.INPUT.INTERPOLATION}' is not one of "
                         f"{', '.join(_INTERPOLATION)}.")
    return _INTERPOLATION[name]


def _normalize(cfg: CN) -> T.Normalize:
    return T.Normalize(mean=list(cfg.INPUT.PIXEL_MEAN), std=list(cfg.INPUT.PIXEL_STD))


def build_train_transform(cfg: CN) -> T.Compose:
    choices = list(cfg.INPUT.TRANSFORMS)
    unknown = [c for c in choices if c not in KNOWN]
    if unknown:
        raise ValueError(f"INPUT.TRANSFORMS has unsupported entries {unknown}; supported: {', '.join(KNOWN)}.")
    size = tuple(cfg.INPUT.SIZE)
    steps = []
    if "random_resized_crop" in choices:
        steps.append(T.RandomResizedCrop(size, scale=tuple(cfg.INPUT.RRCROP_SCALE),
                                         interpolation=_interpolation(cfg)))
    else:
        steps.append(T.Resize(max(size), interpolation=_interpolation(cfg)))
        if "random_crop" in choices:
            steps.append(T.RandomCrop(size))
        else:
            steps.append(T.CenterCrop(size))
    if "random_flip" in choices:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToTensor())
    if "normalize" in choices:
        steps.append(_normalize(cfg))
    return T.Compose(steps)


def build_test_transform(cfg: CN) -> T.Compose:
    size = tuple(cfg.INPUT.SIZE)
    steps = [T.Resize(max(size), interpolation=_interpolation(cfg)), T.CenterCrop(size), T.ToTensor()]
    if "normalize" in list(cfg.INPUT.TRANSFORMS):
        steps.append(_normalize(cfg))
    return T.Compose(steps)
