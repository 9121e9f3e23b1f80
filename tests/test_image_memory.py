"""The loaders' image fast paths against the plain loader (``benchmark.image_memory``):
decoded images kept in memory (``SPEED.MEMORY_IMAGES``) and tensors made per batch
(``SPEED.BATCH_TENSORS``) give the same batches and the same training trajectory bit for
bit, draw the same random numbers, and fall back to the files where the images do not fit."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import benchmark
from benchmark.image_memory import STORE, DecodedStore
from benchmark.images import ImageReadError
from benchmark.loaders import image_loader, train_loader
from benchmark.trainer import train
from datasets.build import build_dataset
from datasets.synthetic import write_synthetic_dataset

SWITCHES = [(False, False), (True, False), (False, True), (True, True)]  # (MEMORY_IMAGES, BATCH_TENSORS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    write_synthetic_dataset("eurosat", root, n_classes=4, n_train=6, n_val=2, n_test=3, image_size=40)
    return build_dataset("eurosat", root, num_shots=5, seed=1, subsample="all")


def _cfg(memory: bool, batches: bool, **more):
    cfg = benchmark.make_config("coop", "eurosat", **{"DATALOADER.NUM_WORKERS": 0, "SPEED.MEMORY_IMAGES": memory,
                                                     "SPEED.BATCH_TENSORS": batches, **more})
    cfg.INPUT.SIZE = (32, 32)
    cfg.freeze()
    return cfg


def _epochs(loader, n=2):
    torch.manual_seed(3)
    out = [(images.clone(), labels.clone()) for _ in range(n) for images, labels in loader]
    return out, torch.rand(1)  # what the random stream gives next: the same draws were made


@pytest.mark.parametrize("augment", [True, False])
def test_batches_are_the_plain_loaders_bit_for_bit(data, augment):
    STORE.clear()
    runs = []
    for memory, batches in SWITCHES:
        cfg = _cfg(memory, batches)
        loader = image_loader(data.train, cfg, torch.device("cpu"), augment=augment, batch_size=4, shuffle=augment,
                              drop_last=False)
        runs.append(_epochs(loader))
    (plain, after), *fast_runs = runs
    for (fast, fast_after), switches in zip(fast_runs, SWITCHES[1:]):
        assert torch.equal(fast_after, after), switches
        assert len(fast) == len(plain)
        for (x, y), (fx, fy) in zip(plain, fast):
            assert fx.dtype == x.dtype and fx.shape == x.shape and fx.is_contiguous()
            assert torch.equal(fx, x) and torch.equal(fy, y), switches
    assert len(STORE.images) == len(data.train)  # decoded once, kept for the next loader


def test_training_trajectory_is_bit_identical_with_the_image_paths_on_and_off(tiny_clip, data):
    for name in ("mma", "coop"):
        runs = []
        for memory, batches in SWITCHES:
            STORE.clear()
            cfg = _cfg(memory, batches, **{"OPTIM.MAX_EPOCH": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4})
            torch.manual_seed(0)
            model = benchmark.build(name, data.classnames, clip=copy.deepcopy(tiny_clip))
            torch.manual_seed(1)
            result = train(model, data.train, cfg, torch.device("cpu"), "fp32")
            learned = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            runs.append((result.epoch_losses, learned, result.steps))
        losses, learned, steps = runs[0]
        assert steps == 10 and len(losses) == 2
        for (fast_losses, fast_learned, _), switches in zip(runs[1:], SWITCHES[1:]):
            # exactly, not within a tolerance: the claim is bit identity, and both runs train the same
            # model with the same operations on the same batches in this process
            assert fast_losses == losses, (name, switches)
            for k in learned:
                assert torch.equal(fast_learned[k], learned[k]), (name, switches, k)


def test_images_that_do_not_fit_are_read_from_the_files(data):
    STORE.clear()
    cfg = _cfg(True, False, **{"SPEED.MEMORY_IMAGES_MB": 0})
    loader = train_loader(data.train, cfg, torch.device("cpu"))
    assert loader.dataset.images is None and len(STORE.images) == 0
    assert torch.equal(_epochs(loader)[0][0][0], _epochs(train_loader(data.train, _cfg(False, False),
                                                                        torch.device("cpu")))[0][0][0])
    with pytest.raises(ValueError, match="MEMORY_IMAGES_MB"):
        train_loader(data.train, _cfg(True, False, **{"SPEED.MEMORY_IMAGES_MB": -1}), torch.device("cpu"))


def _bytes(items) -> int:
    from PIL import Image

    total = 0
    for item in items:
        with Image.open(item.impath) as image:
            total += image.width * image.height * 3
    return total


def test_the_store_keeps_its_budget_and_decodes_changed_files_again(data):
    store = DecodedStore()
    first, second = data.train[:3], data.train[3:6]
    need = _bytes(first)
    assert store.decoded(first, budget=need - 1) is None and not store.images  # too big: nothing decoded
    kept = store.decoded(first, budget=need)
    assert len(kept) == 3 and store.bytes == need
    again = store.decoded(first, budget=need)
    assert all(a is b for a, b in zip(kept, again))  # decoded once
    budget = max(need, _bytes(second))
    store.decoded(second, budget=budget)  # the least recently used make room
    assert store.bytes <= budget and {os.path.abspath(d.impath) for d in second} <= {k[0] for k in store.images}
    path = second[0].impath
    stat = os.stat(path)
    old = DecodedStore.key(second[0])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "changed": decoded again
    (fresh,) = store.decoded(second[:1], budget=10 * budget)
    assert fresh is not store.images[old] and store.images[DecodedStore.key(second[0])] is fresh


def test_an_unreadable_image_is_named_when_the_images_are_decoded(data, tmp_path):
    import shutil

    from datasets.base import Datum

    broken = tmp_path / "broken.jpg"
    shutil.copy(data.train[0].impath, broken)
    broken.write_bytes(broken.read_bytes()[:200])  # a header and little else
    items = [Datum(impath=str(broken), label=0, classname="ox")]
    with pytest.raises(ImageReadError, match="broken.jpg.*class 'ox'"):
        DecodedStore().decoded(items, budget=2**20)
