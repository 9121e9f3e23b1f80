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

An entry (format 2) is a dict: ``format``, ``key``, ``features``, ``n_images`` and
``checksum``, the CRC-32 of the features' dtype, shape and bytes
(``benchmark.files.tensor_checksum``), checked on every load (hashing runs at GB/s; the
features are a few MB where encoding the images takes seconds to minutes).  An entry that
cannot be loaded, holds another key or row count, or fails its checksum is logged (one
warning naming the file) and computed again, the new file renamed over it; nothing of it
is served.  torch's own reader does not check the CRC of the archive it loads, so a
flipped byte in the tensor data would otherwise pass.  Entries of format 1 (no checksum)
are computed again in place, without a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from benchmark.files import tensor_checksum, write_torch_atomic
from datasets.base import Datum

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # part of the key: what a feature depends on
ENTRY_FORMAT = 2  # of the stored dict; 2: with the checksum of the features


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


def frozen_features(encode: Callable[[torch.Tensor], torch.Tensor], data: Sequence[Datum],
                    cache_dir: Path | None, *, key: str, batches: Callable[[], Iterator[torch.Tensor]],
                    device: torch.device, autocast: Callable = torch.no_grad) -> torch.Tensor:
    """``encode`` (the frozen image tower) of every test-transformed image of ``data``, on
    ``device``; read from the cache entry ``key`` under ``cache_dir`` when it exists, else
    computed from ``batches()`` (the images, in order) and stored."""
    path = Path(cache_dir) / "features" / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        features = _load_entry(path, key, len(data))
        if features is not None:
            return features.to(device)
    parts = []
    with torch.no_grad():
        for images in batches():
            with autocast():
                parts.append(encode(images))
    features = torch.cat(parts) if parts else torch.zeros(0)
    if path is not None:
        stored = features.cpu()
        write_torch_atomic(path, {"format": ENTRY_FORMAT, "key": key, "features": stored, "n_images": len(data),
                                  "checksum": tensor_checksum(stored)})
    return features


def _load_entry(path: Path, key: str, rows: int) -> torch.Tensor | None:
    """The features of the entry at ``path`` (CPU) when it is whole and holds ``key`` with
    ``rows`` rows; else None (logged as damaged, but for an entry of another format)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("format") != ENTRY_FORMAT and isinstance(stored.get("features"), torch.Tensor):
            log.info("Feature cache entry %s is of format %s, not %d; computing it again.", path,
                     stored.get("format", 1), ENTRY_FORMAT)
            return None
        features = stored["features"]
        if stored.get("key") != key or features.shape[0] != rows:
            problem = f"it holds key {stored.get('key')} with {features.shape[0]} rows, not {key} with {rows}"
        elif stored.get("checksum") != tensor_checksum(features):
            problem = "its features fail their checksum"
        else:
            return features
    except Exception as exc:  # a damaged entry is recomputed, never trusted
        problem = f"it cannot be loaded: {exc}"
    log.warning("Feature cache entry %s is damaged (%s); computing it again.", path, problem)
    return None
