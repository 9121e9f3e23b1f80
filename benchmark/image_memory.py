"""Two exact fast paths of the loaders: images kept decoded in memory, tensors made per batch.

``SPEED.MEMORY_IMAGES``: a loader reads its images from files again in every epoch,
although the decoded image never changes; only the random crop and flip that follow do.
When the images of a loader's list fit in ``SPEED.MEMORY_IMAGES_MB`` (their sizes are read
from the file headers first), each one is decoded once per process, as the PIL loader
decodes it (``benchmark.images.open_image``: RGB), and kept; the loader's transforms, the
random ones included, then run on the kept image, drawing the same random numbers in the
same order.  The transforms the harness builds return new images and never change their
input, so a kept image stays what the file holds.  Images are kept by path, file size and
modification time, so a changed file is decoded again; the least recently used ones make
room when the budget is full.  With loader workers the kept images are decoded in the
loader's own process, before the workers start, so the workers inherit them.

``SPEED.BATCH_TENSORS``: ToTensor and Normalize cost more than the crop on small images
when applied one image at a time.  The loader's dataset stops at the PIL steps and returns
uint8 pixels; the batch is stacked and converted at once with the same operations
(``permute``, ``contiguous``, ``to(float)``, ``div(255)``, then Normalize's ``sub_`` and
``div_`` with the same broadcast mean and std): element-wise operations, so every value
equals the one-image path's bit for bit.

``tests/test_image_memory.py`` checks both against the plain path: the batches, and the
training trajectories of MMA and CoOp with each switch on and off.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data import default_collate
from torchvision import transforms as T

from benchmark.images import ImageReadError, open_image
from benchmark.workers import quiet_worker
from datasets.base import Datum

_Key = tuple[str, int, int]


class DecodedStore:
    """Decoded RGB images of this process, kept by (path, size, mtime), least recently used
    ones dropped beyond ``budget`` bytes."""

    def __init__(self) -> None:
        self.images: OrderedDict[_Key, Image.Image] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    @staticmethod
    def key(item: Datum) -> _Key:
        try:
            st = os.stat(item.impath)
        except OSError as exc:
            raise ImageReadError.of(item, exc) from exc
        return os.path.abspath(item.impath), int(st.st_size), int(st.st_mtime_ns)

    @staticmethod
    def _bytes(image: Image.Image) -> int:
        return image.width * image.height * len(image.getbands())

    def decoded(self, data: Sequence[Datum], budget: int) -> list[Image.Image] | None:
        """The decoded images of ``data`` (decoded now where not kept yet), or None when
        they would not fit in ``budget`` bytes together (nothing is decoded then)."""
        keys = [self.key(item) for item in data]
        with self.lock:
            missing = {k: item for k, item in zip(keys, data) if k not in self.images}
            kept = sum(self._bytes(self.images[k]) for k in dict.fromkeys(keys) if k in self.images)
        needed = kept + sum(_header_bytes(item) for item in missing.values())
        if needed > budget:
            return None
        fresh = {k: open_image(item) for k, item in missing.items()}
        with self.lock:
            for k, image in fresh.items():
                if k not in self.images:
                    self.images[k] = image
                    self.bytes += self._bytes(image)
            wanted = set(keys)
            for k in wanted:
                self.images.move_to_end(k)
            out = [self.images[k] for k in keys]
            for k in list(self.images):  # oldest first; never the images of this list
                if self.bytes <= budget:
                    break
                if k not in wanted:
                    self.bytes -= self._bytes(self.images.pop(k))
        return out

    def clear(self) -> None:
        with self.lock:
            self.images.clear()
            self.bytes = 0


STORE = DecodedStore()


def _header_bytes(item: Datum) -> int:
    """Bytes of the decoded RGB image, from the file's header (nothing is decoded)."""
    try:
        with Image.open(item.impath) as img:
            return img.width * img.height * 3
    except (OSError, SyntaxError) as exc:
        raise ImageReadError.of(item, exc) from exc


def split_transform(transform: T.Compose) -> tuple[T.Compose, T.Normalize | None] | None:
    """``transform`` cut before its ToTensor: (the PIL steps, the Normalize after it or None);
    None when it does not end in ToTensor and an optional Normalize (no batch conversion)."""
    steps = list(getattr(transform, "transforms", []))
    cut = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    if cut is None:
        return None
    tail = steps[cut + 1:]
    if len(tail) > 1 or (tail and not isinstance(tail[0], T.Normalize)):
        return None
    return T.Compose(steps[:cut]), (tail[0] if tail else None)


class PixelsToBatch:
    """The collate function of a loader whose dataset returns (uint8 [H, W, C] pixels, label):
    (float batch [B, C, H, W] equal to stacking ToTensor (and Normalize) of each image, labels)."""

    def __init__(self, normalize: T.Normalize | None):
        self.normalize = normalize

    def __call__(self, items: list[tuple[np.ndarray, int]]):
        pixels = torch.from_numpy(np.stack([p for p, _ in items]))
        images = pixels.permute(0, 3, 1, 2).contiguous().to(dtype=torch.get_default_dtype()).div(255)  # ToTensor
        if self.normalize is not None:
            images = self.normalize(images)  # the same broadcast sub_ and div_ as for one image
        return images, default_collate([label for _, label in items])


class FastImageList(Dataset):
    """Images of a list of Datum -> (image, label), from kept decoded images (``images``)
    or the files, through ``transform``; with ``pixels`` the transform is the PIL steps
    only and the item is uint8 [H, W, C] pixels (``PixelsToBatch`` makes the batch)."""

    def __init__(self, data: Sequence[Datum], transform: Callable, images: list[Image.Image] | None = None,
                 pixels: bool = False):
        self.data = list(data)
        self.transform = transform
        self.images = images
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if torch.utils.data.get_worker_info() is not None:
            quiet_worker()
        item = self.data[index]
        image = self.images[index] if self.images is not None else open_image(item)
        out = self.transform(image)
        if self.pixels:
            out = np.asarray(out, dtype=np.uint8)
            if out.ndim == 2:
                out = out[:, :, None]
        return out, item.label
