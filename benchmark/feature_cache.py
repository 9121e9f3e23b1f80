"""Test-set features of a frozen image encoder, computed once and shared on disk.

Zero-shot CLIP, CoOp, CoCoOp, KgCoOp, CLIP-Adapter, Tip-Adapter and the linear probe
never change CLIP's image tower: their image features are ``clip.encode_image`` of the
test-transformed image, whatever the method, seed or shot count.  The first evaluation
of a dataset split computes them; every later one (another method, seed, shot count or
protocol) reads them back and only runs the method's own head on them.

An entry is keyed by everything that can change a feature: the backbone's weights
(``backbone_id``), CLIP's weight dtype and the run's precision (which sets the autocast
of evaluation), the device kind, the test transform's settings and the image list (path,
size and modification time of each file, in order).  Entries are ``.pt`` files of a CPU
tensor, written atomically and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from benchmark import speed
from datasets.base import Datum

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def device_kind(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def feature_key(data: Sequence[Datum], cfg, *, backbone_id: str, weight_dtype: torch.dtype,
                precision: str, device: torch.device) -> str:
    h = hashlib.sha256()
    header = {
        "version": FORMAT_VERSION, "backbone": backbone_id, "weights": str(weight_dtype),
        "precision": precision, "device": device_kind(device),
        "size": list(cfg.INPUT.SIZE), "interpolation": str(cfg.INPUT.INTERPOLATION),
        "normalize": "normalize" in list(cfg.INPUT.TRANSFORMS),
        "mean": list(cfg.INPUT.PIXEL_MEAN), "std": list(cfg.INPUT.PIXEL_STD),
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    for item in data:
        st = os.stat(item.impath)
        h.update(f"\n{item.impath}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def image_batches(data: Sequence[Datum], cfg, device: torch.device, batch_size: int, *,
                  build: bool = True) -> Iterator[torch.Tensor]:
    """Test-transformed images of ``data`` on ``device``, in order: from the decoded-image
    cache (IMAGE_CACHE; with ``build`` False only when its entry exists already) or
    through the PIL loader."""
    root = speed.cache_dir(cfg)
    if root is not None and speed.enabled(cfg, "IMAGE_CACHE"):
        from benchmark.image_cache import DecodedImages, image_cache_key

        if build or (root / "images" / f"{image_cache_key(data, cfg)}.json").is_file():
            yield from DecodedImages.open_or_build(data, cfg, root).batches(batch_size, device, cfg)
            return
    from benchmark.trainer import test_loader

    for images, _ in test_loader(data, cfg, device, batch_size=batch_size):
        yield images.to(device, non_blocking=True)


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def frozen_features(encode: Callable[[torch.Tensor], torch.Tensor], data: Sequence[Datum], cfg,
                    device: torch.device, *, key: str, batch_size: int,
                    autocast: Callable = torch.no_grad) -> torch.Tensor:
    """``encode`` (the frozen image tower) of every test-transformed image of ``data``, on
    ``device``; read from the cache entry ``key`` when it exists, else computed and stored."""
    root = speed.cache_dir(cfg)
    path = root / "features" / f"{key}.pt" if root is not None else None
    if path is not None and path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            features = stored["features"]
            if stored.get("key") == key and features.shape[0] == len(data):
                return features.to(device)
        except Exception as exc:  # a damaged entry is recomputed, never trusted
            log.warning("Feature cache entry %s is unreadable (%s); computing it again.", path, exc)
    parts = []
    with torch.no_grad():
        # the features are what is kept: decoded images are read only if another run left them
        for images in image_batches(data, cfg, device, batch_size, build=False):
            with autocast():
                parts.append(encode(images))
    features = torch.cat(parts) if parts else torch.zeros(0)
    if path is not None:
        _atomic_save({"key": key, "features": features.cpu(), "n_images": len(data)}, path)
    return features
