"""Files the harness writes and reads back carry checksums; damage is recomputed, never served.

Three kinds of file: a few-shot draw (``split_fewshot/shot_K-seed_S.pkl``, the official
pickle with a ``.crc32.json`` checksum file beside it), ImageNet's cached file lists
(``preprocessed.pkl``, the same) and the built-in worlds' datasets (a manifest of a CRC-32
per file).  For each, damage that still loads (a byte of a path or a label flipped, a byte
of a JPEG flipped so that it decodes to other pixels) and same-size garbage must be found:
one warning naming the file, the content computed again and written over the damaged
one, and what is read afterwards equal to what was there before the damage.  A draw the
official code wrote (no checksum file) is read as it is.  Real files in tmp folders; the
world tests use a world cache of their own, never the session's.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import synthetic
from datasets.base import checksum_path, read_dassl_pickle
from datasets.build import build_dataset
from datasets.synthetic import write_synthetic_dataset
from datasets.worlds import MANIFEST, WORLDS_ENV, prepare_world, world_folder_name

DASSL_MODULE = "dassl.data.datasets.base_dataset"


# --------------------------------------------------------------------------- damage


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("datasets")]


def _overwrite(path: Path, data: bytes) -> None:
    """``data`` written over the file in place (same inode, same size)."""
    assert len(data) == path.stat().st_size
    with open(path, "r+b") as handle:
        handle.write(data)


def _garbage(path: Path, seed: int = 0) -> None:
    size = path.stat().st_size
    _overwrite(path, np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())


def _flip_path_byte(path: Path) -> None:
    """The last digit of the first stored image path's file name changed (0 <-> 1, 2 <-> 3,
    ...): the pickle still loads, with another (often existing) image in its place."""
    raw = bytearray(path.read_bytes())
    for op, arg, pos in pickletools.genops(bytes(raw)):
        if isinstance(arg, str) and arg.lower().endswith((".jpg", ".jpeg")):
            start = raw.index(arg.encode(), pos)
            name_start = start + len(arg) - len(os.path.basename(arg))
            digit = max(i for i in range(name_start, start + len(arg)) if chr(raw[i]).isdigit())
            raw[digit] ^= 0x01
            return _overwrite(path, bytes(raw))
    raise AssertionError(f"no image path in {path}")


def _flip_label_byte(path: Path) -> None:
    """The first stored label changed to its neighbour (0 <-> 1, 2 <-> 3, ...): the pickle
    still loads, with an image under another class."""
    raw = bytearray(path.read_bytes())
    ops = [op for op in pickletools.genops(bytes(raw)) if op[0].name != "MEMOIZE"]
    for (_, arg, _), (next_op, _, pos) in zip(ops, ops[1:]):
        if arg == "_label" and next_op.name == "BININT1":
            raw[pos + 1] ^= 0x01
            return _overwrite(path, bytes(raw))
    raise AssertionError(f"no label in {path}")


PICKLE_DAMAGE = {"a path byte": _flip_path_byte, "a label byte": _flip_label_byte, "garbage": _garbage}


def _still_loads_otherwise(path: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """The damaged pickle, copied without its checksum file, loads, to other content."""
    copy = tmp_path / "unchecked.pkl"
    shutil.copyfile(path, copy)
    assert read_dassl_pickle(copy, dataset_dir) != read_dassl_pickle(path.with_name("pristine.pkl"), dataset_dir)


def _keep_pristine(path: Path) -> bytes:
    raw = path.read_bytes()
    path.with_name("pristine.pkl").write_bytes(raw)  # no checksum file: read as it is
    return raw


def _records(data) -> list[tuple[str, int, str]]:
    return [(d.impath, d.label, d.classname) for d in data]


# --------------------------------------------------------------------------- few-shot draws


@pytest.mark.parametrize("damage", list(PICKLE_DAMAGE))
def test_a_damaged_fewshot_draw_is_drawn_again_and_rewritten(tmp_path, caplog, damage):
    write_synthetic_dataset("dtd", tmp_path, n_classes=4, n_train=6, n_val=3)
    first = build_dataset("dtd", tmp_path, num_shots=2, seed=3)
    cache = Path(first.fewshot_cache)
    assert Path(checksum_path(cache)).is_file()
    original = _keep_pristine(cache)
    PICKLE_DAMAGE[damage](cache)
    assert cache.read_bytes() != original and len(cache.read_bytes()) == len(original)
    if damage != "garbage":  # without the check this draw would be served
        _still_loads_otherwise(cache, tmp_path / "dtd", tmp_path)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = build_dataset("dtd", tmp_path, num_shots=2, seed=3)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(cache) in warnings[0] and "drawing it again" in warnings[0]
    assert _records(again.train) == _records(first.train) and _records(again.val) == _records(first.val)
    assert cache.read_bytes() == original  # rewritten: the same draw, the same bytes
    assert not list(cache.parent.glob("*.tmp"))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = build_dataset("dtd", tmp_path, num_shots=2, seed=3, subsample="base")
    assert _warnings(caplog) == []  # warned once: the rewritten draw passes
    assert _records(third.train) == _records(build_dataset("dtd", tmp_path, num_shots=2, seed=3,
                                                           subsample="base").train)


def test_a_damaged_checksum_file_gets_the_draw_drawn_again(tmp_path, caplog):
    write_synthetic_dataset("dtd", tmp_path, n_classes=3)
    first = build_dataset("dtd", tmp_path, num_shots=1, seed=1)
    sidecar = Path(checksum_path(first.fewshot_cache))
    text = sidecar.read_text()
    _garbage(sidecar)
    with caplog.at_level(logging.WARNING):
        again = build_dataset("dtd", tmp_path, num_shots=1, seed=1)
    assert len(_warnings(caplog)) == 1 and sidecar.name in _warnings(caplog)[0]
    assert _records(again.train) == _records(first.train) and sidecar.read_text() == text


@pytest.fixture
def official_datum():
    """The official ``Datum`` class in a throw-away module tree, removed afterwards."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", DASSL_MODULE]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)

    class Datum:  # as the official class: private attributes
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = DASSL_MODULE, "Datum"
    sys.modules[DASSL_MODULE].Datum = Datum
    yield Datum
    for n, mod in saved.items():
        if mod is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = mod


def test_a_draw_the_official_code_wrote_loads_as_it_is(tmp_path, official_datum, caplog):
    write_synthetic_dataset("dtd", tmp_path, n_classes=2)
    full = build_dataset("dtd", tmp_path)
    chosen = [full.train[-1], full.train[0]]  # no seed gives this draw: it must be used as it is
    cache = tmp_path / "dtd" / "split_fewshot" / "shot_1-seed_1.pkl"
    cache.parent.mkdir()
    official = {"train": [official_datum(d.impath, d.label, 0, d.classname) for d in chosen],
                "val": [official_datum(full.val[0].impath, full.val[0].label, 0, full.val[0].classname)]}
    cache.write_bytes(pickle.dumps(official, protocol=2))  # the official writer: no checksum file
    raw = cache.read_bytes()
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("dtd", tmp_path, num_shots=1, seed=1)
    assert _records(ds.train) == _records(chosen) and _records(ds.val) == _records(full.val[:1])
    assert _warnings(caplog) == [] and cache.read_bytes() == raw
    assert not Path(checksum_path(cache)).exists()  # reading adds no checksum file


# --------------------------------------------------------------------------- ImageNet's file lists


@pytest.mark.parametrize("damage", list(PICKLE_DAMAGE))
def test_damaged_imagenet_file_lists_are_scanned_again_and_rewritten(tmp_path, caplog, damage):
    write_synthetic_dataset("imagenet", tmp_path, n_classes=3, n_train=3, n_test=2)
    first = build_dataset("imagenet", tmp_path)
    cache = tmp_path / "imagenet" / "preprocessed.pkl"
    assert Path(checksum_path(cache)).is_file()
    original = _keep_pristine(cache)
    PICKLE_DAMAGE[damage](cache)
    assert cache.read_bytes() != original
    if damage != "garbage":
        _still_loads_otherwise(cache, tmp_path / "imagenet", tmp_path)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = build_dataset("imagenet", tmp_path)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(cache) in warnings[0] and "scanning the folders again" in warnings[0]
    assert _records(again.train) == _records(first.train) and _records(again.test) == _records(first.test)
    assert cache.read_bytes() == original  # the scan written again (the same scan, the same bytes)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _records(build_dataset("imagenet", tmp_path).train) == _records(first.train)
    assert _warnings(caplog) == []


# --------------------------------------------------------------------------- the built-in worlds


def _flip_jpeg_byte(path: Path) -> None:
    """One byte of the JPEG's coded data flipped so that it still decodes, to other pixels."""
    raw = path.read_bytes()
    before = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    for offset in range(len(raw) // 2, len(raw) - 2):
        damaged = bytearray(raw)
        damaged[offset] ^= 0x01
        try:
            after = np.asarray(Image.open(io.BytesIO(bytes(damaged))).convert("RGB"))
        except OSError:
            continue
        if after.shape == before.shape and (after != before).any():
            return _overwrite(path, bytes(damaged))
    raise AssertionError(f"no byte of {path} decodes to other pixels when flipped")


WORLD_DAMAGE = {"a flipped byte that still decodes": _flip_jpeg_byte, "garbage": _garbage}


@pytest.fixture
def world_cache(tmp_path, monkeypatch) -> Path:
    """A world cache of this test's own: the session's shared one is never damaged."""
    folder = tmp_path / "worlds"
    monkeypatch.setenv(WORLDS_ENV, str(folder))
    return folder


def _set_aside(root: Path) -> list[Path]:
    return sorted(root.parent.glob(f".{root.name}.replaced-*.old"))


@pytest.mark.parametrize("damage", list(WORLD_DAMAGE))
def test_a_damaged_world_is_written_again(world_cache, tmp_path, caplog, damage):
    said = []
    root = prepare_world("synthetic", tmp_path / "out", said.append)
    assert root.parent == world_cache and (root / MANIFEST).is_file() and len(said) == 1
    build_dataset("eurosat", root, num_shots=2, seed=1)  # a draw written into the world later: not listed
    victim = sorted((root / "eurosat" / "2750").rglob("*.jpg"))[5]
    rel = victim.relative_to(root).as_posix()
    original = victim.read_bytes()
    WORLD_DAMAGE[damage](victim)
    assert victim.read_bytes() != original
    if damage != "garbage":  # without the check these pixels would be served
        Image.open(victim).convert("RGB")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert prepare_world("synthetic", tmp_path / "out", said.append) == root
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(root) in warnings[0] and rel in warnings[0]
    assert len(said) == 2 and "checksums" in said[1]
    assert victim.read_bytes() == original  # the world written again: the same bytes
    (aside,) = _set_aside(root)  # the damaged folder set aside, not deleted under a reader
    assert (aside / rel).read_bytes() != original
    assert not list(world_cache.glob("*.tmp"))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stamp = (root / MANIFEST).stat().st_mtime_ns
        assert prepare_world("synthetic", tmp_path / "out", said.append) == root
    assert _warnings(caplog) == [] and len(said) == 2 and (root / MANIFEST).stat().st_mtime_ns == stamp


def test_a_world_written_before_manifests_is_written_again_once(world_cache, tmp_path, caplog):
    said = []
    root = prepare_world("synthetic", tmp_path / "out", said.append)
    (root / MANIFEST).unlink()  # as an older harness left it
    with caplog.at_level(logging.WARNING):
        assert prepare_world("synthetic", tmp_path / "out", said.append) == root
    assert len(said) == 2 and "before worlds carried a manifest" in said[1] and (root / MANIFEST).is_file()
    assert _warnings(caplog) == []  # not damage: said, not warned
    assert prepare_world("synthetic", tmp_path / "out", said.append) == root and len(said) == 2


def test_a_damaged_manifest_gets_the_world_written_again(world_cache, tmp_path, caplog):
    root = prepare_world("synthetic", tmp_path / "out")
    manifest = (root / MANIFEST).read_bytes()
    _garbage(root / MANIFEST)
    with caplog.at_level(logging.WARNING):
        prepare_world("synthetic", tmp_path / "out")
    assert len(_warnings(caplog)) == 1 and MANIFEST in _warnings(caplog)[0]
    assert (root / MANIFEST).read_bytes() == manifest


def test_a_damaged_world_under_the_results_folder_is_written_again(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # the world cache cannot be written: the world goes under the output
    root = prepare_world("synthetic", tmp_path / "out", cache=blocker / "worlds")
    assert root == tmp_path / "out" / "synthetic_data" and (root / MANIFEST).is_file()
    victim = root / synthetic.MARKER
    original = victim.read_bytes()
    _garbage(victim)
    with caplog.at_level(logging.WARNING):
        prepare_world("synthetic", tmp_path / "out", cache=blocker / "worlds")
    assert len(_warnings(caplog)) == 1 and synthetic.MARKER in _warnings(caplog)[0]
    assert victim.read_bytes() == original


def test_folders_set_aside_are_removed_an_hour_later(world_cache, tmp_path):
    name = world_folder_name("synthetic")
    old = world_cache / f".{name}.replaced-{time.time_ns() - 2 * 3600 * 10**9}.old"
    recent = world_cache / f".{name}.replaced-{time.time_ns()}.old"
    for folder in (old, recent):
        (folder / "eurosat").mkdir(parents=True)
    prepare_world("synthetic", tmp_path / "out")
    assert not old.exists() and recent.is_dir()
