"""The decoded-image cache against the PIL path, on real image files written here.

Every batch must equal ``torch.stack`` of ``build_test_transform(cfg)`` applied to the
image as the PIL loader opens it, bit for bit; a second open must reuse the entry without
decoding; the key must follow the transform settings, the order and the files; partial
entries must be rebuilt (those that cannot have come from a build killed half-way with a
warning); unreadable files must raise the loader's OSError.  Damaged content of a whole
entry: ``tests/test_cache_integrity.py``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.config import get_cfg_default
from benchmark.image_cache import IMAGE_DIR, DecodedImages, image_cache_key
from benchmark.transforms import build_test_transform
from datasets.base import Datum
from datasets.build import build_dataset

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# (file name, PIL mode, (width, height)): sizes, aspect ratios and modes the loader meets
IMAGES = [
    ("rgb_wide.jpg", "RGB", (53, 31)),
    ("gray_tall.jpg", "L", (19, 44)),
    ("rgba_square.png", "RGBA", (37, 37)),
    ("palette_wide.png", "P", (64, 23)),
    ("cmyk.jpg", "CMYK", (30, 41)),
    ("tiny_upsampled.jpg", "RGB", (7, 5)),
    ("rgb_large.png", "RGB", (97, 80)),
]


def _cfg(size=(24, 24), interpolation="bicubic", normalize=True):
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = tuple(size)
    cfg.INPUT.INTERPOLATION = interpolation
    cfg.INPUT.TRANSFORMS = ("normalize",) if normalize else ()
    cfg.INPUT.PIXEL_MEAN = CLIP_MEAN
    cfg.INPUT.PIXEL_STD = CLIP_STD
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour ramps plus noise: detail for the resampling filters to disagree on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    ramps = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                      127 + 120 * np.sin((x + y) / 3.0)], axis=-1)
    return np.clip(ramps + rng.normal(0, 25, ramps.shape), 0, 255).astype(np.uint8)


def _write_image(path: Path, mode: str, size: tuple[int, int], seed: int) -> None:
    rgb = Image.fromarray(_picture(*size, seed))
    if mode == "P":
        image = rgb.quantize(colors=32)
    elif mode == "RGBA":
        image = rgb.convert("RGBA")
        image.putalpha(Image.fromarray(_picture(*size, seed + 1)[..., 0]))
    else:
        image = rgb.convert(mode)
    image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)


def _write_images(folder: Path, seed: int = 0) -> list[Datum]:
    folder.mkdir(parents=True, exist_ok=True)
    data = []
    for i, (name, mode, size) in enumerate(IMAGES):
        _write_image(folder / name, mode, size, seed + i)
        data.append(Datum(str(folder / name), i, name.split(".")[0]))
    return data


def _reference(data, cfg) -> torch.Tensor:
    transform = build_test_transform(cfg)
    images = []
    for item in data:
        with Image.open(item.impath) as img:
            images.append(transform(img.convert("RGB")))
    return torch.stack(images)


def _cached(cache: DecodedImages, cfg, batch_size: int, device="cpu") -> torch.Tensor:
    batches = list(cache.batches(batch_size, device, cfg))
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    for batch in batches:
        assert batch.dtype == torch.float32 and batch.is_contiguous() and batch.device.type == torch.device(device).type
    return torch.cat(batches).cpu()


def _entry_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / IMAGE_DIR).iterdir())


@pytest.fixture
def images(tmp_path):
    return _write_images(tmp_path / "pictures")


@pytest.fixture(scope="module")
def mixed_data(synthetic_root, tmp_path_factory):
    """A real synthetic test split (square and non-square JPEGs) plus the odd modes above."""
    extra = _write_images(tmp_path_factory.mktemp("odd_images"))
    return list(build_dataset("eurosat", synthetic_root).test) + extra


# -- (1) exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_batches_equal_the_pil_path(mixed_data, tmp_path, interpolation):
    n = len(mixed_data)
    cache = DecodedImages.open_or_build(mixed_data, _cfg(interpolation=interpolation), tmp_path)
    assert len(cache) == n and cache.shape == (n, 24, 24, 3) and cache.path.is_file()
    assert isinstance(cache.array, np.memmap) and not cache.array.flags.writeable
    for normalize in (True, False):
        cfg = _cfg(interpolation=interpolation, normalize=normalize)
        expected = _reference(mixed_data, cfg)
        for batch_size in (7, 16, n + 5):
            assert batch_size >= n or n % batch_size
            got = _cached(cache, cfg, batch_size)
            assert got.shape == expected.shape and torch.equal(got, expected), (normalize, batch_size)


def test_non_square_size_with_workers(mixed_data, tmp_path):
    cfg = _cfg(size=(20, 28))  # rows, columns: resize the shorter side to 28, crop 20 x 28
    cfg.DATALOADER.NUM_WORKERS = 2  # the default worker count; order must survive the workers
    cache = DecodedImages.open_or_build(mixed_data, cfg, tmp_path)
    assert cache.shape == (len(mixed_data), 20, 28, 3)
    assert torch.equal(_cached(cache, cfg, 9), _reference(mixed_data, cfg))


def test_empty_list(tmp_path):
    cache = DecodedImages.open_or_build([], _cfg(), tmp_path)
    assert len(cache) == 0 and list(cache.batches(4, "cpu", _cfg())) == []


def test_batches_refuse_another_size(images, tmp_path):
    cache = DecodedImages.open_or_build(images, _cfg(), tmp_path)
    with pytest.raises(ValueError, match="size"):
        cache.batches(4, "cpu", _cfg(size=(32, 32)))
    with pytest.raises(ValueError, match="bilinear"):
        cache.batches(4, "cpu", _cfg(interpolation="bilinear"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_the_pil_path(mixed_data, tmp_path):
    cfg = _cfg()
    cache = DecodedImages.open_or_build(mixed_data, cfg, tmp_path)
    for normalize in (True, False):
        cfg = _cfg(normalize=normalize)
        assert torch.equal(_cached(cache, cfg, 7, "cuda"), _reference(mixed_data, cfg))


# -- (2) reuse ------------------------------------------------------------------------------------
def test_second_open_reuses_the_entry(images, tmp_path):
    cfg = _cfg()
    first = DecodedImages.open_or_build(images, cfg, tmp_path / "cache")
    before = first.path.stat()
    json_before = first.path.with_suffix(".json").stat()
    pixels = _cached(first, cfg, 4)
    # Same size and mtime, other bytes: the key cannot see it, and a decode would fail.
    victim = Path(images[0].impath)
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    started = time.perf_counter()
    second = DecodedImages.open_or_build(images, cfg, tmp_path / "cache")
    assert time.perf_counter() - started < 1.0
    after = second.path.stat()
    assert second.key == first.key and second.path == first.path
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    json_after = second.path.with_suffix(".json").stat()
    assert (json_after.st_ino, json_after.st_mtime_ns) == (json_before.st_ino, json_before.st_mtime_ns)
    assert torch.equal(_cached(second, cfg, 3), pixels)
    assert _entry_files(tmp_path / "cache") == [f"{first.key}.json", f"{first.key}.u8"]


# -- (3) key ------------------------------------------------------------------------------------
def test_key_follows_size_interpolation_order_and_files(images):
    cfg = _cfg()
    key = image_cache_key(images, cfg)
    assert len(key) == 64 and key == image_cache_key(list(images), cfg.clone())
    # the device-side conversion is not part of the entry
    same = _cfg(normalize=False)
    same.INPUT.PIXEL_MEAN, same.DATALOADER.TEST.BATCH_SIZE = [0.5, 0.5, 0.5], 3
    assert image_cache_key(images, same) == key
    assert image_cache_key(images, _cfg(size=(28, 28))) != key
    assert image_cache_key(images, _cfg(interpolation="bilinear")) != key
    assert image_cache_key(images[::-1], cfg) != key
    assert image_cache_key(images[:-1], cfg) != key
    victim = Path(images[2].impath)
    st = victim.stat()
    _write_image(victim, "RGBA", (37, 37), seed=99)  # new pixels
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert image_cache_key(images, cfg) != key


def test_changed_file_gives_a_new_correct_entry(images, tmp_path):
    cfg = _cfg()
    old = DecodedImages.open_or_build(images, cfg, tmp_path)
    victim = Path(images[0].impath)
    st = victim.stat()
    _write_image(victim, "RGB", (41, 60), seed=7)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    new = DecodedImages.open_or_build(images, cfg, tmp_path)
    assert new.key != old.key
    assert torch.equal(_cached(new, cfg, 5), _reference(images, cfg))


# -- (4) partial entries ----------------------------------------------------------------------------
def _damage_truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _damage_drop_json(path: Path) -> None:
    path.with_suffix(".json").unlink()


def _damage_bad_json(path: Path) -> None:
    path.with_suffix(".json").write_text('{"version": 1, "shape": [')


def _damage_wrong_shape(path: Path) -> None:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] -= 1
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, warned", [(_damage_truncate, True), (_damage_drop_json, False),
                                            (_damage_bad_json, True), (_damage_wrong_shape, False)])
def test_partial_entry_is_rebuilt(images, tmp_path, caplog, damage, warned):
    cfg = _cfg()
    first = DecodedImages.open_or_build(images, cfg, tmp_path)
    inode = first.path.stat().st_ino
    damage(first.path)
    with caplog.at_level(logging.WARNING, logger="benchmark.image_cache"):
        rebuilt = DecodedImages.open_or_build(images, cfg, tmp_path)
    # a missing or other description: not built yet, or of another format; the rest is damage
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == int(warned) and all(str(first.path) in m for m in messages), messages
    assert rebuilt.path == first.path and rebuilt.path.stat().st_ino != inode
    assert torch.equal(_cached(rebuilt, cfg, 4), _reference(images, cfg))
    assert _entry_files(tmp_path) == [f"{first.key}.json", f"{first.key}.u8"]


def test_leftovers_of_a_killed_build_are_ignored(images, tmp_path):
    cfg = _cfg()
    key = image_cache_key(images, cfg)
    folder = tmp_path / IMAGE_DIR
    folder.mkdir()
    (folder / f"{key}.u8").write_bytes(b"\x7f" * 100)  # renamed array without its JSON
    stale = folder / f".{key}.u8.dead.tmp"  # a build killed long ago
    stale.write_bytes(b"\x7f" * 100)
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    running = folder / f".{key}.u8.alive.tmp"  # a build still running elsewhere
    running.write_bytes(b"\x7f" * 100)
    cache = DecodedImages.open_or_build(images, cfg, tmp_path)
    assert torch.equal(_cached(cache, cfg, 4), _reference(images, cfg))
    assert _entry_files(tmp_path) == sorted([f"{key}.json", f"{key}.u8", running.name])


# -- (5) unreadable files -----------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("corruption", ["truncated", "not_an_image"])
def test_unreadable_image_raises_oserror_naming_the_file(images, tmp_path, workers, corruption):
    victim = Path(images[3].impath).with_name("broken.jpg")
    good = Path(images[0].impath).read_bytes()
    victim.write_bytes(good[: len(good) // 2] if corruption == "truncated" else b"not a jpeg at all")
    data = images + [Datum(str(victim), 9, "broken")]
    with pytest.raises(OSError, match="broken.jpg") as raised:
        DecodedImages.open_or_build(data, _cfg(), tmp_path / "cache", num_workers=workers)
    assert str(raised.value).startswith(f"Cannot read image {victim} (class 'broken'): ")  # the loader's words
    assert _entry_files(tmp_path / "cache") == []  # nothing half-written is left


def test_missing_image_raises_oserror_naming_the_file(images, tmp_path):
    data = images + [Datum(str(tmp_path / "gone.jpg"), 9, "gone")]
    with pytest.raises(OSError, match="gone.jpg"):
        DecodedImages.open_or_build(data, _cfg(), tmp_path / "cache")
