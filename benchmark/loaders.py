"""Image lists into batches: the training and test loaders, and the evaluation's data path.

``train_loader`` and ``test_loader`` are the reference toolbox's: a RandomSampler that
drops the last incomplete batch when there is at least one full batch, with the train
transforms; in order with the test transform.  Every loader is a ``QuietLoader`` (its
workers survive a sweep's signals and end with it).  Under ``SPEED.MEMORY_IMAGES`` a
loader's images are decoded once per process and kept (when they fit), under
``SPEED.BATCH_TENSORS`` ToTensor and Normalize run per batch (``benchmark.image_memory``):
both give the plain loader's batches bit for bit.

An evaluation gets its inputs one of three ways, decided once where it starts
(``eval_inputs``) and handed down:

- ``features``: a method whose image features are the frozen tower's output reads the
  test features from the feature cache (computed on the first evaluation of the images);
- ``decoded``: test images come from the decoded-image cache (decoded and resized once,
  normalised on the device);
- ``files``: each image file through the test transform (every fast path off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from benchmark import speed
from benchmark.image_cache import DecodedImages
from benchmark.image_memory import STORE, FastImageList, PixelsToBatch, split_transform
from benchmark.images import ImageList
from benchmark.transforms import build_test_transform, build_train_transform
from benchmark.workers import QuietLoader, worker_count
from datasets.base import Datum

EVAL_PATHS = ("features", "decoded", "files")


def image_loader(data: Sequence[Datum], cfg, device: torch.device, *, augment: bool, batch_size: int,
                 shuffle: bool, drop_last: bool = False) -> DataLoader:
    """(image, label) batches of ``data``: the train transforms (``augment``) or the test
    transform, shuffled by a RandomSampler or in order."""
    transform = build_train_transform(cfg) if augment else build_test_transform(cfg)
    memory = speed.enabled(cfg, "MEMORY_IMAGES")
    split = split_transform(transform) if speed.enabled(cfg, "BATCH_TENSORS") else None
    extra = {}
    if not memory and split is None:
        dataset = ImageList(data, transform)
    else:
        images = STORE.decoded(data, speed.memory_images_budget(cfg)) if memory else None
        if split is None:
            dataset = FastImageList(data, transform, images)
        else:
            dataset = FastImageList(data, split[0], images, pixels=True)
            extra["collate_fn"] = PixelsToBatch(split[1])
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    return QuietLoader(dataset, batch_size=int(batch_size), sampler=sampler, num_workers=worker_count(cfg),
                       drop_last=drop_last, pin_memory=device.type == "cuda", **extra)


def train_loader(data: Sequence[Datum], cfg, device: torch.device) -> DataLoader:
    """Shuffled, augmented, ``TRAIN_X.BATCH_SIZE``; the last incomplete batch is dropped
    when there is at least one full batch (the reference loader)."""
    batch = int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
    return image_loader(data, cfg, device, augment=True, batch_size=batch, shuffle=True,
                        drop_last=len(data) >= batch)


def test_loader(data: Sequence[Datum], cfg, device: torch.device, batch_size: int | None = None) -> DataLoader:
    """In order, test transform, ``TEST.BATCH_SIZE`` (or ``batch_size``)."""
    return image_loader(data, cfg, device, augment=False, batch_size=batch_size or int(cfg.DATALOADER.TEST.BATCH_SIZE),
                        shuffle=False)


@dataclass(frozen=True)
class EvalInputs:
    """Where an evaluation's images come from (``path``: one of ``EVAL_PATHS``), with what
    it needs to get them: the config's transform settings, the device, the batch size, the
    cache folder and whether decoded images may be read from it, and the backbone's id
    (part of a feature-cache key)."""

    path: str
    cfg: object
    device: torch.device
    batch_size: int
    cache_dir: Path | None = None
    image_cache: bool = False
    backbone_id: str | None = None


def eval_inputs(model, cfg, device: torch.device, backbone_id: str | None = None) -> EvalInputs:
    """The data path of ``model``'s evaluations under ``cfg``'s fast-path switches."""
    root = speed.cache_dir(cfg)
    image_cache = root is not None and speed.enabled(cfg, "IMAGE_CACHE")
    if (model.frozen_image_features and backbone_id is not None and root is not None
            and speed.enabled(cfg, "FEATURE_CACHE")):
        path = "features"
    else:
        path = "decoded" if image_cache else "files"
    return EvalInputs(path, cfg, device, speed.eval_batch_size(cfg), root, image_cache, backbone_id)


def image_batches(inputs: EvalInputs, data: Sequence[Datum]) -> Iterator[torch.Tensor]:
    """Test-transformed images of ``data`` on the device, in order.  On the ``decoded`` path
    they come from the decoded-image cache (decoded first where needed); on the
    ``features`` path from it only where another run left the entry (features are what is
    kept); otherwise from the files."""
    if inputs.image_cache and (inputs.path == "decoded" or DecodedImages.exists(data, inputs.cfg, inputs.cache_dir)):
        yield from DecodedImages.open_or_build(data, inputs.cfg, inputs.cache_dir).batches(
            inputs.batch_size, inputs.device, inputs.cfg)
        return
    for images, _ in test_loader(data, inputs.cfg, inputs.device, batch_size=inputs.batch_size):
        yield images.to(inputs.device, non_blocking=True)
