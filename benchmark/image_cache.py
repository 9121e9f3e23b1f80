"""Decoded test images, stored once per image list as a memory-mapped uint8 array.

Evaluation decodes every test JPEG, resizes it and crops its centre, for every method,
seed and shot count, although the result never changes.  This module does that work once
per image list and keeps the pixels on disk as raw bytes: ``<cache_dir>/images/<key>.u8``
is a C-ordered ``[N, H, W, 3]`` uint8 array (the images after the test transform's
Resize and CenterCrop, before ToTensor, in the order of the list) and ``<key>.json``
describes it (format version, shape, transform settings, image paths).  Evaluation then
slices the memory map per batch, moves the bytes to the device and converts them there.

Exactness: the steps before ToTensor are taken from ``build_test_transform(cfg)`` itself,
applied to the image as the PIL loader opens it, and the device conversion repeats
ToTensor and Normalize op for op (float32, divide by 255, subtract the mean, divide by
the std), so every batch equals ``torch.stack`` of the PIL path's tensors bit for bit.
The divisor 255 is a tensor on the device: a CUDA division by a Python number multiplies
by its reciprocal, which can differ from the CPU's true division in the last bit.

An entry is keyed by the format version, the library versions that resample, INPUT.SIZE,
INPUT.INTERPOLATION and, for each image in order, its path, file size and modification
time (``image_cache_key``); normalisation is not part of it.  Both files are written to a
temporary name and renamed, the JSON last, so an entry counts only when its JSON exists
and the array file has the size it names; anything else (a build killed half-way, a
truncated file) is built again, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision import transforms as T

from benchmark.files import atomic_path, write_json_atomic
from benchmark.images import ImageReadError, open_image
from benchmark.transforms import build_test_transform
from benchmark.workers import QuietLoader, worker_count
from datasets.base import Datum

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGE_DIR = "images"
BUILD_BATCH_SIZE = 32  # images per decoding batch (and per write into the array)
STALE_TMP_SECONDS = 3600  # a temporary file untouched this long belongs to a dead build


# -- key and transform ------------------------------------------------------------------------
def image_cache_key(data: Sequence[Datum], cfg) -> str:
    """sha256 over the format version, the resampling libraries' versions, INPUT.SIZE,
    INPUT.INTERPOLATION and each datum's path, file size and mtime_ns, in order."""
    h = hashlib.sha256()
    header = {
        "version": FORMAT_VERSION, "pillow": PIL.__version__, "torchvision": torchvision.__version__,
        "size": [int(s) for s in cfg.INPUT.SIZE], "interpolation": str(cfg.INPUT.INTERPOLATION).lower(),
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    for item in data:
        st = _stat(item)
        h.update(f"\0{os.path.abspath(item.impath)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read_error(item: Datum, exc: BaseException) -> ImageReadError:
    """The PIL loader's error for a file that cannot be read (see benchmark.images)."""
    return ImageReadError.of(item, exc)


def _stat(item: Datum) -> os.stat_result:
    try:
        return os.stat(item.impath)
    except OSError as exc:
        raise _read_error(item, exc) from exc


def _split_test_transform(cfg) -> tuple[T.Compose, T.Normalize | None]:
    """``build_test_transform(cfg)`` cut at ToTensor: (the PIL steps, Normalize or None)."""
    steps = list(build_test_transform(cfg).transforms)
    cut = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    tail = steps[cut + 1:] if cut is not None else []
    if cut is None or len(tail) > 1 or (tail and not isinstance(tail[0], T.Normalize)):
        raise ValueError(f"The image cache replays a test transform of PIL steps, ToTensor and an "
                         f"optional Normalize; this one is {steps}.")
    return T.Compose(steps[:cut]), (tail[0] if tail else None)


def _shape(n: int, cfg) -> tuple[int, int, int, int]:
    height, width = (int(s) for s in cfg.INPUT.SIZE)
    return n, height, width, 3


# -- building ----------------------------------------------------------------------------------
class _PilSteps(Dataset):
    """Images of a list of Datum, opened as the PIL loader opens them, through the test
    transform's PIL steps -> uint8 [H, W, 3], or the loader's ImageReadError for a file
    that cannot be read.  The error is returned, not raised, so that the build stops its
    workers at once and raises it itself (a worker's exception would keep the loader and
    its workers alive in the traceback until a later garbage collection)."""

    def __init__(self, data: Sequence[Datum], steps: T.Compose, shape: tuple[int, int, int]):
        self.data = list(data)
        self.steps = steps
        self.shape = shape

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> np.ndarray | ImageReadError:
        item = self.data[index]
        try:
            image = open_image(item)
        except ImageReadError as error:
            return error
        array = np.asarray(self.steps(image), dtype=np.uint8)
        if array.shape != self.shape:
            raise ValueError(f"Image {item.impath} is {array.shape} after the test transform's "
                             f"resize and crop; expected {self.shape}.")
        return array


def _stack(arrays: list[np.ndarray | OSError]) -> np.ndarray | OSError:
    """A batch as one uint8 array, or the first read error among its images."""
    failure = next((a for a in arrays if isinstance(a, OSError)), None)
    return failure if failure is not None else np.stack(arrays)


def _remove_stale_tmp(folder: Path, key: str) -> None:
    """Temporary files of this entry that no build has touched for a while (killed builds)."""
    now = time.time()
    for tmp in folder.glob(f".{key}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()
        except FileNotFoundError:
            pass


def _write_array(path: Path, data: Sequence[Datum], cfg, num_workers: int) -> None:
    """Decode ``data`` into ``path`` (a temporary file renamed into place when complete)."""
    shape = _shape(len(data), cfg)
    steps, _ = _split_test_transform(cfg)
    workers = min(num_workers, math.ceil(len(data) / BUILD_BATCH_SIZE))
    loader = QuietLoader(_PilSteps(data, steps, shape[1:]), batch_size=BUILD_BATCH_SIZE, shuffle=False,
                         num_workers=workers, collate_fn=_stack, drop_last=False)
    with atomic_path(path) as tmp:
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        start, failure = 0, None
        for batch in loader:
            if isinstance(batch, OSError):
                failure = batch
                break  # leaving the loop ends the loader's iterator and its workers
            out[start:start + len(batch)] = batch
            start += len(batch)
        if failure is not None:
            raise failure
        if start != len(data):
            raise RuntimeError(f"Decoded {start} of {len(data)} images for {path}.")
        out.flush()
        del out


def _meta(data: Sequence[Datum], cfg, key: str) -> dict:
    return {"version": FORMAT_VERSION, "key": key, "shape": list(_shape(len(data), cfg)),
            "size": [int(s) for s in cfg.INPUT.SIZE],
            "interpolation": str(cfg.INPUT.INTERPOLATION).lower(),
            "impaths": [str(item.impath) for item in data]}


def _open_entry(path: Path, meta: dict) -> np.memmap | None:
    """The entry's array, or None when the entry is missing, partial or not this one."""
    try:
        stored = json.loads(path.with_suffix(".json").read_text())
        if stored != meta or path.stat().st_size != math.prod(meta["shape"]):
            return None
        return np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    except (OSError, ValueError):
        return None


# -- the cache ---------------------------------------------------------------------------------
class DecodedImages:
    """uint8 [N, H, W, 3] array (np.memmap, read-only) of the images of `data` after the test
    transform's Resize + CenterCrop (before ToTensor), in the order of `data`."""

    @staticmethod
    def exists(data: Sequence[Datum], cfg, cache_dir: str | Path) -> bool:
        """Whether an entry of ``data`` has been written under ``cache_dir``."""
        return (Path(cache_dir) / IMAGE_DIR / f"{image_cache_key(list(data), cfg)}.json").is_file()

    def __init__(self, key: str, path: Path, array: np.ndarray, meta: dict):
        self.key = key
        self.path = path
        self.array = array
        self.meta = meta

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @classmethod
    def open_or_build(cls, data: Sequence[Datum], cfg, cache_dir: str | Path, *,
                      num_workers: int | None = None) -> DecodedImages:
        """The entry of ``data`` under ``cache_dir``; decoded and written first when it is
        missing or incomplete.  An unreadable image raises the PIL loader's OSError."""
        data = list(data)
        key = image_cache_key(data, cfg)
        folder = Path(cache_dir) / IMAGE_DIR
        path = folder / f"{key}.u8"
        meta = _meta(data, cfg, key)
        if not data:  # nothing to map (an empty file cannot be mapped); nothing is written
            empty = np.zeros(_shape(0, cfg), dtype=np.uint8)
            empty.flags.writeable = False
            return cls(key, path, empty, meta)
        array = _open_entry(path, meta)
        if array is None:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_stale_tmp(folder, key)
            workers = worker_count(cfg) if num_workers is None else max(0, int(num_workers))
            started = time.perf_counter()
            _write_array(path, data, cfg, workers)
            write_json_atomic(path.with_suffix(".json"), meta)
            log.info("Decoded %d test images into %s in %.1f s.", len(data), path,
                     time.perf_counter() - started)
            array = _open_entry(path, meta)
            if array is None:
                raise OSError(f"The image cache entry {path} was written but cannot be read back.")
        return cls(key, path, array, meta)

    def batches(self, batch_size: int, device: torch.device | str, cfg) -> Iterator[torch.Tensor]:
        """Float32 batches on `device`, in order, equal to what build_test_transform(cfg) gives for each image
        (ToTensor: /255; then Normalize with cfg.INPUT.PIXEL_MEAN/STD if "normalize" in cfg.INPUT.TRANSFORMS).
        The uint8 slice is moved to the device (pinned memory + non_blocking on CUDA) and converted there."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self._check_cfg(cfg)
        _, normalize = _split_test_transform(cfg)
        return self._batches(int(batch_size), torch.device(device), normalize)

    def _batches(self, batch_size: int, device: torch.device,
                 normalize: T.Normalize | None) -> Iterator[torch.Tensor]:
        pin = device.type == "cuda"
        scale = torch.tensor(255.0, dtype=torch.float32, device=device)  # see the module docstring
        if normalize is not None:
            mean = torch.as_tensor(normalize.mean, dtype=torch.float32, device=device)[:, None, None]
            std = torch.as_tensor(normalize.std, dtype=torch.float32, device=device)[:, None, None]
        for start in range(0, len(self), batch_size):
            chunk = self.array[start:start + batch_size]
            host = torch.empty(chunk.shape, dtype=torch.uint8, pin_memory=pin)
            host.numpy()[...] = chunk
            images = host.to(device, non_blocking=pin).permute(0, 3, 1, 2).contiguous()
            images = images.to(torch.float32).div_(scale)  # ToTensor
            if normalize is not None:
                images.sub_(mean).div_(std)  # Normalize
            yield images

    def _check_cfg(self, cfg) -> None:
        size = [int(s) for s in cfg.INPUT.SIZE]
        interpolation = str(cfg.INPUT.INTERPOLATION).lower()
        if size != self.meta["size"] or interpolation != self.meta["interpolation"]:
            raise ValueError(f"The image cache entry {self.path} holds images of size {self.meta['size']} "
                             f"({self.meta['interpolation']}); the config asks for {size} ({interpolation}).")
