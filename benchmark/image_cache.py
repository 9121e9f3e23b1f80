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

An entry is keyed by the key version, the library versions that resample, INPUT.SIZE,
INPUT.INTERPOLATION and, for each image in order, its path, file size and modification
time (``image_cache_key``); normalisation is not part of it.  Both files are written to a
temporary name and renamed, the JSON last, so an entry counts only when its JSON exists
and the array file has the size it names; anything else (a build killed half-way, a
truncated file) is built again, never read.

Content: the JSON also holds a CRC-32 (``benchmark.files.checksum``) of every block of
``BUILD_BATCH_SIZE`` images, computed from the decoded pixels as they are written
(``"checksum": {"algorithm", "block_images", "blocks"}``).  Opening an entry maps the array
and checks every block against it before a single batch is served; an entry that fails
is logged (one warning naming the file) and decoded again, the new files renamed over the
damaged ones.  Hashing runs at several GB/s, far faster than decoding the images it stands
for.  A process remembers the entries it has checked (path, device, inode, size,
modification and change times, the stored checksums) and does not hash them again; any
write to the file, or to its times, changes that identity and makes it checked anew.  An
entry whose file changed less than ``SETTLE_SECONDS`` before its check is not remembered:
file times advance in coarse ticks, so a write within the same tick could leave them
unchanged.  Entries of format 1 (no checksums) fail the description check and are built
again in place.
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

from benchmark.files import CHECKSUM, atomic_path, checksum, write_json_atomic
from benchmark.images import ImageReadError, open_image
from benchmark.transforms import build_test_transform
from benchmark.workers import QuietLoader, worker_count
from datasets.base import Datum

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # of the JSON description; 2: block checksums
KEY_VERSION = 1  # of what the pixels depend on (the key): unchanged, so entries of format 1 are replaced in place
IMAGE_DIR = "images"
BUILD_BATCH_SIZE = 32  # images per decoding batch (and per write into the array, and per checksum block)
STALE_TMP_SECONDS = 3600  # a temporary file untouched this long belongs to a dead build
SETTLE_SECONDS = 2.0  # an entry changed more recently than this when checked is not remembered as checked
_VERIFIED: set[tuple] = set()  # identities of entries this process has checked (see _verified_id)


# -- key and transform ------------------------------------------------------------------------
def image_cache_key(data: Sequence[Datum], cfg) -> str:
    """sha256 over the key version, the resampling libraries' versions, INPUT.SIZE,
    INPUT.INTERPOLATION and each datum's path, file size and mtime_ns, in order."""
    h = hashlib.sha256()
    header = {
        "version": KEY_VERSION, "pillow": PIL.__version__, "torchvision": torchvision.__version__,
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


def _write_array(path: Path, data: Sequence[Datum], cfg, num_workers: int) -> list[str]:
    """Decode ``data`` into ``path`` (a temporary file renamed into place when complete);
    returns the checksum of every block of ``BUILD_BATCH_SIZE`` images, of the decoded
    pixels (not read back from the file)."""
    shape = _shape(len(data), cfg)
    steps, _ = _split_test_transform(cfg)
    workers = min(num_workers, math.ceil(len(data) / BUILD_BATCH_SIZE))
    loader = QuietLoader(_PilSteps(data, steps, shape[1:]), batch_size=BUILD_BATCH_SIZE, shuffle=False,
                         num_workers=workers, collate_fn=_stack, drop_last=False)
    with atomic_path(path) as tmp:
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        start, failure, blocks = 0, None, []
        for batch in loader:
            if isinstance(batch, OSError):
                failure = batch
                break  # leaving the loop ends the loader's iterator and its workers
            out[start:start + len(batch)] = batch
            start += len(batch)
            blocks.append(checksum(np.ascontiguousarray(batch)))  # the loader's batches are the blocks
        if failure is not None:
            raise failure
        if start != len(data):
            raise RuntimeError(f"Decoded {start} of {len(data)} images for {path}.")
        out.flush()
        del out
    return blocks


def _meta(data: Sequence[Datum], cfg, key: str) -> dict:
    return {"version": FORMAT_VERSION, "key": key, "shape": list(_shape(len(data), cfg)),
            "size": [int(s) for s in cfg.INPUT.SIZE],
            "interpolation": str(cfg.INPUT.INTERPOLATION).lower(),
            "impaths": [str(item.impath) for item in data]}


def _checksum_meta(blocks: list[str]) -> dict:
    return {"algorithm": CHECKSUM, "block_images": BUILD_BATCH_SIZE, "blocks": blocks}


def _open_entry(path: Path, meta: dict) -> np.memmap | None:
    """The entry's array, or None when the entry is missing, of another format or
    description, or damaged: a description that cannot be read, an array file missing or
    of another size than it names, content that fails the stored checksums (these logged:
    one warning naming the file)."""
    try:
        text = path.with_suffix(".json").read_text()
    except FileNotFoundError:
        return None  # not written yet, or a build killed between its two renames
    except OSError as exc:
        return _damaged(path, f"its description cannot be read: {exc}")
    try:
        stored = json.loads(text)
        expected = stored.pop("checksum", None)
    except (ValueError, AttributeError, TypeError):
        return _damaged(path, "its description is not a JSON object")
    if stored != meta:
        return None  # another format (format 1: no checksums) or other settings: built again
    try:
        with open(path, "rb") as handle:  # the status and the map of one and the same file
            status = os.fstat(handle.fileno())
            if status.st_size != math.prod(meta["shape"]):
                return _damaged(path, f"it holds {status.st_size} bytes, not the {math.prod(meta['shape'])} "
                                      f"of its shape {meta['shape']}")
            array = np.memmap(handle, dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    except OSError as exc:
        return _damaged(path, f"it cannot be read: {exc}")
    problem = _damage(path, status, array, expected)
    return array if problem is None else _damaged(path, problem)


def _damaged(path: Path, problem: str) -> None:
    log.warning("Image cache entry %s is damaged (%s); decoding its images again.", path, problem)
    return None


def _verified_id(path: Path, status: os.stat_result, expected: dict) -> tuple:
    return (str(path.resolve()), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
            status.st_ctime_ns, json.dumps(expected, sort_keys=True))


def _damage(path: Path, status: os.stat_result, array: np.ndarray, expected) -> str | None:
    """Why ``array`` (mapped from ``path``, whose status is ``status``) does not match the
    ``expected`` checksums of its description, or None when every block matches."""
    try:
        algorithm, block, blocks = expected["algorithm"], int(expected["block_images"]), list(expected["blocks"])
    except (TypeError, KeyError, ValueError):
        return "its description holds no valid checksums"
    if algorithm != CHECKSUM or block < 1 or len(blocks) != math.ceil(len(array) / block):
        return f"its description's checksums do not fit its {len(array)} images"
    identity = _verified_id(path, status, expected)
    if identity in _VERIFIED:
        return None
    bad = [i for i, want in enumerate(blocks) if checksum(array[i * block:(i + 1) * block]) != want]
    if bad:
        first = bad[0] * block
        return (f"{len(bad)} of {len(blocks)} blocks of images fail their checksum, the first holding images "
                f"{first} to {min(first + block, len(array)) - 1}")
    if time.time() - max(status.st_mtime, status.st_ctime) > SETTLE_SECONDS:
        _VERIFIED.add(identity)
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
        """The entry of ``data`` under ``cache_dir``, its content checked; decoded and
        written first when it is missing, incomplete or damaged.  An unreadable image
        raises the PIL loader's OSError."""
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
            blocks = _write_array(path, data, cfg, workers)
            write_json_atomic(path.with_suffix(".json"), {**meta, "checksum": _checksum_meta(blocks)})
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
