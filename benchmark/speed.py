"""Switches of the exact fast paths (the config's ``SPEED`` node).

Every fast path computes what the plain path computes (the same logits within the
precision's tolerance, the same training trajectory); ``tests/test_speed.py`` proves
each one against the plain path.  ``SPEED.ENABLED False`` switches them all off, and
``SPEED.<NAME> False`` one of them:

* ``TRUNCATE_TEXT``: the text transformer is causal, so the features at the end-of-text
  token do not depend on the padding after it; prompts are cut to the longest real
  token sequence of the class set instead of 77 tokens.
* ``SHARED_PREFIX``: for the same reason, positions that every prompt of a class set
  shares (CoOp's, KgCoOp's and ProGrad's ``[SOS]`` and context, CoCoOp's per image) have
  the same hidden states in every prompt; they run once and the other positions attend
  to that copy (``methods.text_prefix``).
* ``FROZEN_TEXT``: text layers below a method's first trained layer see a fixed input
  (MMA's hand-written prompt below its first adapter); their output is computed once
  per class set, precision and device.
* ``FEATURE_CACHE``: methods whose image features are the frozen encoder's output
  (zero-shot CLIP, CoOp, CoCoOp, KgCoOp, CLIP-Adapter, Tip-Adapter, linear probe)
  share test-set features on disk, keyed by backbone, precision, device, transform
  and image list (``benchmark.feature_cache``).
* ``IMAGE_CACHE``: test images are decoded, resized and centre-cropped once into a
  memory-mapped uint8 array and normalised on the device (``benchmark.image_cache``).
* ``MEMORY_IMAGES``: a loader's images (training images above all, read again every
  epoch) are decoded once per process and kept in memory when they fit in
  ``MEMORY_IMAGES_MB``; the transforms, random ones included, run on the kept image
  (``benchmark.image_memory``).
* ``BATCH_TENSORS``: a loader's ToTensor and Normalize run on the whole batch instead of
  each image (element-wise: the same values bit for bit; ``benchmark.image_memory``).
* ``EVAL_BATCH_SIZE``: a larger evaluation batch.
"""

from __future__ import annotations

from pathlib import Path

FAST_PATHS = ("TRUNCATE_TEXT", "SHARED_PREFIX", "FROZEN_TEXT", "FEATURE_CACHE", "IMAGE_CACHE", "MEMORY_IMAGES", "BATCH_TENSORS")


def enabled(cfg, name: str) -> bool:
    """Whether the fast path ``name`` is on in ``cfg`` (a config without SPEED: off)."""
    speed = cfg.get("SPEED") if hasattr(cfg, "get") else None
    if speed is None:
        return False
    if name not in speed:
        raise KeyError(f"Unknown fast path SPEED.{name}; known: {', '.join(FAST_PATHS)}.")
    return bool(speed.ENABLED) and bool(speed[name])


def cache_dir(cfg) -> Path | None:
    """Where the disk caches live, or None (no directory configured: disk caches off)."""
    speed = cfg.get("SPEED") if hasattr(cfg, "get") else None
    if speed is None or not str(speed.CACHE_DIR):
        return None
    return Path(str(speed.CACHE_DIR))


def eval_batch_size(cfg) -> int:
    speed = cfg.get("SPEED") if hasattr(cfg, "get") else None
    if speed is not None and bool(speed.ENABLED) and int(speed.EVAL_BATCH_SIZE) > 0:
        return int(speed.EVAL_BATCH_SIZE)
    return int(cfg.DATALOADER.TEST.BATCH_SIZE)


def memory_images_budget(cfg) -> int:
    """Bytes of decoded images ``MEMORY_IMAGES`` may keep per process."""
    speed = cfg.get("SPEED") if hasattr(cfg, "get") else None
    megabytes = float(speed.get("MEMORY_IMAGES_MB", 0)) if speed is not None else 0.0
    if megabytes < 0:
        raise ValueError(f"SPEED.MEMORY_IMAGES_MB must be 0 or more megabytes; got {megabytes:g}.")
    return int(megabytes * 2**20)
