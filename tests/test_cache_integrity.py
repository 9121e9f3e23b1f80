"""Disk-cache entries whose content was damaged are found, logged, rebuilt and never served.

Damage that keeps an entry's description and size (the bytes of the decoded-image array
overwritten or one byte flipped, cached features altered and saved back, a byte of a
saved tensor flipped on disk) must be found by the entry's checksums: one warning naming
the file, the entry computed again and renamed over the damaged one, and every number
(batches, features, per-image predictions, accuracies) as without the damage.  Real
files, the real loaders and the tiny CLIP throughout.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import assert_close, clip_ops

import benchmark
from benchmark import image_cache
from benchmark import predictions as per_image
from benchmark.config import get_cfg_default
from benchmark.image_cache import IMAGE_DIR, DecodedImages
from benchmark.loaders import eval_inputs
from benchmark.trainer import execute, image_features
from datasets.build import build_dataset

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _cfg():
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (24, 24)
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.TRANSFORMS = ("normalize",)
    cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD = CLIP_MEAN, CLIP_STD
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def _batches(cache: DecodedImages, cfg) -> torch.Tensor:
    return torch.cat(list(cache.batches(16, "cpu", cfg)))


def _warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def _overwrite_with_random_bytes(path: Path, seed: int = 0) -> None:
    """The whole file rewritten in place (same inode, same size) with random bytes."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.write(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())


def _flip_middle_byte(path: Path) -> None:
    """One byte in the middle of the file inverted in place (same inode, same size)."""
    middle = path.stat().st_size // 2
    with open(path, "r+b") as handle:
        handle.seek(middle)
        value = handle.read(1)[0]
        handle.seek(middle)
        handle.write(bytes([value ^ 0xFF]))


@pytest.fixture
def images(synthetic_root):
    """80 real JPEGs (three checksum blocks of 32 images)."""
    data = list(build_dataset("eurosat", synthetic_root).train)
    assert len(data) > 2 * image_cache.BUILD_BATCH_SIZE
    return data


# -- the decoded-image cache ----------------------------------------------------------------------
@pytest.mark.parametrize("damage", [_overwrite_with_random_bytes, _flip_middle_byte])
def test_damaged_image_entry_is_found_and_rebuilt(images, tmp_path, caplog, damage):
    cfg = _cfg()
    first = DecodedImages.open_or_build(images, cfg, tmp_path)
    undamaged, pixels = _batches(first, cfg), np.array(first.array)
    inode = first.path.stat().st_ino
    damage(first.path)
    assert first.path.stat().st_ino == inode and not np.array_equal(np.fromfile(first.path, np.uint8),
                                                                     pixels.reshape(-1))
    with caplog.at_level(logging.WARNING, logger="benchmark.image_cache"):
        second = DecodedImages.open_or_build(images, cfg, tmp_path)
    found = _warnings(caplog, "benchmark.image_cache")
    assert len(found) == 1 and str(first.path) in found[0] and "checksum" in found[0], found
    if damage is _flip_middle_byte:  # the block that holds the middle of the array, and only it
        assert "1 of 3 blocks" in found[0], found
    assert second.path == first.path and second.path.stat().st_ino != inode  # renamed over the damaged file
    assert np.array_equal(np.fromfile(second.path, np.uint8), pixels.reshape(-1))
    # exact: the cache serves the stored bytes, converted by the same operations on the same shapes
    assert torch.equal(_batches(second, cfg), undamaged)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="benchmark.image_cache"):
        third = DecodedImages.open_or_build(images, cfg, tmp_path)
    assert _warnings(caplog, "benchmark.image_cache") == [] and third.path.stat().st_ino == second.path.stat().st_ino


def test_damaged_description_checksum_is_found(images, tmp_path, caplog):
    cfg = _cfg()
    first = DecodedImages.open_or_build(images, cfg, tmp_path)
    description = first.path.with_suffix(".json")
    meta = json.loads(description.read_text())
    blocks = list(meta["checksum"]["blocks"])
    meta["checksum"]["blocks"][1] = f"{int(blocks[1], 16) ^ 1:08x}"  # one bit of one stored checksum
    description.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="benchmark.image_cache"):
        DecodedImages.open_or_build(images, cfg, tmp_path)
    found = _warnings(caplog, "benchmark.image_cache")
    assert len(found) == 1 and str(first.path) in found[0] and "1 of 3 blocks" in found[0], found
    assert json.loads(description.read_text())["checksum"]["blocks"] == blocks  # written again


def test_checked_entry_is_remembered_until_its_file_changes(images, tmp_path, caplog):
    cfg = _cfg()
    first = DecodedImages.open_or_build(images, cfg, tmp_path)
    undamaged = _batches(first, cfg)
    # just written: file times advance in coarse ticks, so a fresh entry is checked, not remembered
    assert not any(identity[0] == str(first.path.resolve()) for identity in image_cache._VERIFIED)
    time.sleep(image_cache.SETTLE_SECONDS + 0.2)
    DecodedImages.open_or_build(images, cfg, tmp_path)
    remembered = [identity for identity in image_cache._VERIFIED if identity[0] == str(first.path.resolve())]
    assert len(remembered) == 1
    # damage that restores the modification time: the change time still moves, so it is checked again
    status = first.path.stat()
    _flip_middle_byte(first.path)
    os.utime(first.path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert first.path.stat().st_mtime_ns == status.st_mtime_ns and first.path.stat().st_size == status.st_size
    with caplog.at_level(logging.WARNING, logger="benchmark.image_cache"):
        again = DecodedImages.open_or_build(images, cfg, tmp_path)
    assert len(_warnings(caplog, "benchmark.image_cache")) == 1
    # exact: the cache serves the stored bytes, converted by the same operations on the same shapes
    assert torch.equal(_batches(again, cfg), undamaged)


def test_entry_of_format_1_is_rebuilt_in_place_without_a_warning(images, tmp_path, caplog):
    """An entry written before checksums existed: the same key (its pixels are the same),
    so it is replaced where it lies, not left beside a new one."""
    cfg = _cfg()
    first = DecodedImages.open_or_build(images, cfg, tmp_path)
    undamaged = _batches(first, cfg)
    description = first.path.with_suffix(".json")
    meta = json.loads(description.read_text())
    del meta["checksum"]
    description.write_text(json.dumps({**meta, "version": 1}))
    _flip_middle_byte(first.path)  # format 1 could not have told
    inode = first.path.stat().st_ino
    with caplog.at_level(logging.WARNING, logger="benchmark.image_cache"):
        second = DecodedImages.open_or_build(images, cfg, tmp_path)
    assert _warnings(caplog, "benchmark.image_cache") == []
    assert second.path == first.path and second.path.stat().st_ino != inode
    assert json.loads(description.read_text())["version"] == image_cache.FORMAT_VERSION == 2
    # exact: the cache serves the stored bytes, converted by the same operations on the same shapes
    assert torch.equal(_batches(second, cfg), undamaged)


# -- the feature cache ---------------------------------------------------------------------------
def _features_cfg(cache: Path):
    cfg = benchmark.make_config("zsclip", "eurosat", **{"DATALOADER.NUM_WORKERS": 0, "SPEED.CACHE_DIR": str(cache),
                                                        "SPEED.IMAGE_CACHE": False})
    cfg.INPUT.SIZE = (32, 32)
    cfg.freeze()
    return cfg


def _alter_values(entry: Path) -> None:
    """The entry loaded, one row of its features changed and saved back: the same key, shape and format."""
    stored = torch.load(entry, weights_only=True)
    stored["features"][3] += 1.0
    torch.save(stored, entry)


def _flip_a_stored_value(entry: Path) -> None:
    """One byte of the tensor data flipped on disk (the sign and top exponent bit of one
    float32 in the middle): torch's reader does not notice, the file still loads."""
    features = torch.load(entry, weights_only=True)["features"]
    raw = bytearray(entry.read_bytes())
    start = raw.find(features.numpy().tobytes()[:64])
    assert start >= 0, "the tensor's bytes are stored uncompressed"
    element = features.numel() // 2
    raw[start + 4 * element + 3] ^= 0xC0  # little-endian float32: byte 3 holds the sign and exponent
    entry.write_bytes(bytes(raw))
    assert not torch.equal(torch.load(entry, weights_only=True)["features"], features)


@pytest.mark.parametrize("damage", [_alter_values, _flip_a_stored_value])
def test_damaged_feature_entry_is_recomputed(tiny_clip, synthetic_root, tmp_path, caplog, damage):
    splits = build_dataset("eurosat", synthetic_root, subsample="all")
    data = splits.test
    model = benchmark.build("zsclip", splits.classnames, clip=copy.deepcopy(tiny_clip))
    inputs = eval_inputs(model, _features_cfg(tmp_path), torch.device("cpu"), "tiny")
    assert inputs.path == "features"
    computed = image_features(model, data, inputs, "fp32")
    (entry,) = (tmp_path / "features").glob("*.pt")
    # exact: the cache returns the stored tensor
    assert torch.equal(image_features(model, data, inputs, "fp32"), computed)
    damage(entry)
    inode = entry.stat().st_ino
    with caplog.at_level(logging.WARNING, logger="benchmark.feature_cache"):
        again = image_features(model, data, inputs, "fp32")
    found = _warnings(caplog, "benchmark.feature_cache")
    assert len(found) == 1 and str(entry) in found[0] and "checksum" in found[0], found
    assert_close(again, computed, ops=clip_ops(tiny_clip), what="recomputed features")
    assert entry.stat().st_ino != inode  # written again, renamed over the damaged file
    # exact: what is stored now is what was returned
    assert torch.equal(torch.load(entry, weights_only=True)["features"], again)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="benchmark.feature_cache"):
        assert torch.equal(image_features(model, data, inputs, "fp32"), again)  # exact: read back
    assert _warnings(caplog, "benchmark.feature_cache") == []


def test_feature_entry_of_format_1_is_computed_again_in_place(tiny_clip, synthetic_root, tmp_path, caplog):
    splits = build_dataset("eurosat", synthetic_root, subsample="all")
    model = benchmark.build("zsclip", splits.classnames, clip=copy.deepcopy(tiny_clip))
    inputs = eval_inputs(model, _features_cfg(tmp_path), torch.device("cpu"), "tiny")
    computed = image_features(model, splits.test, inputs, "fp32")
    (entry,) = (tmp_path / "features").glob("*.pt")
    stored = torch.load(entry, weights_only=True)
    stored["features"][3] += 1.0  # format 1 could not have told
    torch.save({k: stored[k] for k in ("key", "features", "n_images")}, entry)  # the dict of format 1
    with caplog.at_level(logging.WARNING, logger="benchmark.feature_cache"):
        again = image_features(model, splits.test, inputs, "fp32")
    assert _warnings(caplog, "benchmark.feature_cache") == []
    assert_close(again, computed, ops=clip_ops(tiny_clip), what="computed again")
    assert torch.load(entry, weights_only=True)["format"] == 2


# -- the analysis cache --------------------------------------------------------------------------
def test_damaged_analysis_entry_is_extracted_again(synthetic_root, tmp_path, caplog, tiny_clip):
    from benchmark.analysis.dataset_level import Settings, run_dataset_level

    settings = Settings(root=synthetic_root, backbones=["tiny-clip-12"], datasets=["oxford_pets", "eurosat"],
                        seeds=[1], samples=6, output=tmp_path / "out", device="cpu")
    first = run_dataset_level(settings)
    (entry,) = (tmp_path / "out" / "cache" / "analysis").glob("image-*.pt")
    stored = torch.load(entry, weights_only=True)
    points = [p.clone() for p in stored["points"]]
    stored["points"][-1][0] += 1.0  # one value of one point; key, shapes and checksums kept
    torch.save(stored, entry)
    with caplog.at_level(logging.WARNING, logger="benchmark.analysis.dataset_level"):
        second = run_dataset_level(settings)
    found = _warnings(caplog, "benchmark.analysis.dataset_level")
    assert len(found) == 1 and str(entry) in found[0] and "checksum" in found[0], found
    assert second.extracted == [("tiny-clip-12", "image")] and second.cached == [("tiny-clip-12", "text")]
    for new, old in zip(torch.load(entry, weights_only=True)["points"], points):
        assert_close(new, old, ops=clip_ops(tiny_clip), what="extracted again")
    # exact: the same extraction and classifiers, repeated on the same shapes in one process
    assert second.frame.equals(first.frame)


# -- end to end: runs through the trainer ----------------------------------------------------------
def _spec(method: str, root: Path, cache: Path):
    from benchmark.protocols import base2novel

    opts = ["OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0", "SPEED.CACHE_DIR", str(cache)]
    return base2novel([method], ["eurosat"], [1], 4, root=str(root), backbone="tiny-clip-12", backbone_id="tiny",
                      opts=opts)[0]


def _run(spec, output: Path) -> tuple[dict, dict[str, per_image.Predictions]]:
    record = execute(spec, "cpu", output=output)
    kept = per_image.load(output, record)
    assert kept is not None and set(kept) == {"base", "novel"}
    return record, kept


def _assert_same_results(first, second) -> None:
    (record, preds), (again, preds_again) = first, second
    for name in ("base", "novel"):
        # exact: integer class indices and counts of the same run, repeated in one process
        assert np.array_equal(preds_again[name].pred, preds[name].pred), name
        assert preds_again[name].images == preds[name].images
        assert again["metrics"][name]["n_correct"] == record["metrics"][name]["n_correct"]
        assert again["metrics"][name]["accuracy"] == record["metrics"][name]["accuracy"]


def test_mma_run_with_damaged_image_entries_gives_the_undamaged_predictions(synthetic_root, tmp_path, caplog):
    cache = tmp_path / "cache"
    spec = _spec("mma", synthetic_root, cache)
    first = _run(spec, tmp_path / "first")
    entries = sorted((cache / IMAGE_DIR).glob("*.u8"))
    assert len(entries) == 2 and not (cache / "features").exists()  # MMA reads decoded test images: base, novel
    pixels = {entry: entry.read_bytes() for entry in entries}
    for seed, entry in enumerate(entries):
        _overwrite_with_random_bytes(entry, seed)
    with caplog.at_level(logging.WARNING, logger="benchmark.image_cache"):
        second = _run(spec, tmp_path / "second")
    found = _warnings(caplog, "benchmark.image_cache")
    assert len(found) == 2 and all(any(str(entry) in message for message in found) for entry in entries), found
    assert all(entry.read_bytes() == pixels[entry] for entry in entries)  # rebuilt
    _assert_same_results(first, second)


def test_zsclip_run_with_damaged_feature_entries_gives_the_undamaged_predictions(synthetic_root, tmp_path, caplog):
    cache = tmp_path / "cache"
    spec = _spec("zsclip", synthetic_root, cache)
    first = _run(spec, tmp_path / "first")
    entries = sorted((cache / "features").glob("*.pt"))
    assert len(entries) == 2  # base and novel test features
    for seed, entry in enumerate(entries):  # every feature replaced by noise: same key, shape and format
        stored = torch.load(entry, weights_only=True)
        generator = torch.Generator().manual_seed(seed)
        stored["features"] = torch.randn(stored["features"].shape, generator=generator)
        torch.save(stored, entry)
    with caplog.at_level(logging.WARNING, logger="benchmark.feature_cache"):
        second = _run(spec, tmp_path / "second")
    found = _warnings(caplog, "benchmark.feature_cache")
    assert len(found) == 2 and all(any(str(entry) in message for message in found) for entry in entries), found
    _assert_same_results(first, second)


# -- checkpoints of the transfer run: restored only when they hold the recorded weights ---------------
def test_a_damaged_checkpoint_is_not_restored_but_trained_again(tmp_path, caplog):
    """Targets asked for later are evaluated on the saved weights when the checkpoint holds
    what the record summarised; a checkpoint that does not is trained again, with a warning."""
    from benchmark.protocols import transfer
    from datasets.synthetic import write_synthetic_root

    root = tmp_path / "data"
    write_synthetic_root(root, ["imagenet", "eurosat", "oxford_pets"])

    def spec(targets):
        return transfer(["coop"], targets, [1], 2, root=str(root), backbone="tiny-clip-12", backbone_id="tiny",
                        opts=["OPTIM.MAX_EPOCH", "2", "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"])[0]

    checkpoint = tmp_path / "learned.pt"
    first = execute(spec(["eurosat"]), "cpu", checkpoint=checkpoint, save_checkpoint=True)
    restored = execute(spec(["eurosat", "oxford_pets"]), "cpu", previous=first, checkpoint=checkpoint)
    assert restored["resumed_from_checkpoint"] and restored["train"] == first["train"]

    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    payload["state"]["prompt_learner.ctx"][0, 0] += 1.0
    torch.save(payload, checkpoint)
    with caplog.at_level(logging.WARNING, logger="benchmark.trainer"):
        again = execute(spec(["eurosat", "oxford_pets"]), "cpu", previous=first, checkpoint=checkpoint)
    assert any("does not hold the weights" in m and str(checkpoint) in m
               for m in _warnings(caplog, "benchmark.trainer"))
    assert not again.get("resumed_from_checkpoint") and again["train"]["steps"] == first["train"]["steps"] > 0
    assert again["learned"] == first["learned"]  # trained again from the start: the same weights, bit for bit
    for name in ("imagenet", "eurosat"):
        assert again["metrics"][name]["n_correct"] == first["metrics"][name]["n_correct"]
