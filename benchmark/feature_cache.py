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
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from benchmark.files import write_torch_atomic
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


def frozen_features(encode: Callable[[torch.Tensor], torch.Tensor], data: Sequence[Datum],
                    cache_dir: Path | None, *, key: str, batches: Callable[[], Iterator[torch.Tensor]],
                    device: torch.device, autocast: Callable = torch.no_grad) -> torch.Tensor:
    """``encode`` (the frozen image tower) of every test-transformed image of ``data``, on
    ``device``; read from the cache entry ``key`` under ``cache_dir`` when it exists, else
    computed from ``batches()`` (the images, in order) and stored."""
    path = Path(cache_dir) / "features" / f"{key}.pt" if cache_dir is not None else None
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
        for images in batches():
            with autocast():
                parts.append(encode(images))
    features = torch.cat(parts) if parts else torch.zeros(0)
    if path is not None:
        write_torch_atomic(path, {"key": key, "features": features.cpu(), "n_images": len(data)})
    return features
