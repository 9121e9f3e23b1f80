"""The toy world's schedule rule (``benchmark.protocols.toy_epochs``): the one change it
makes to any method's official hyper-parameters, the same for every method."""

from __future__ import annotations

import pytest

from benchmark.protocols import TOY_MAX_STEPS, resolve_config, toy_epochs
from datasets.toy import train_size, write_toy_root

SIZES = {"train": 16, "val": 1, "test": 2}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return write_toy_root(tmp_path_factory.mktemp("toy"), ["eurosat"], sizes=SIZES)


def _cfg(method, root, *opts, protocol="base2novel", shots=16, subsample="base"):
    return resolve_config(method, protocol, "eurosat", seed=1, shots=shots, subsample=subsample, root=str(root),
                          backbone="toy-clip", opts=list(opts))


def test_the_rule_by_hand():
    assert TOY_MAX_STEPS == 100
    assert toy_epochs(200, 1, 80, 32) == 1 + 100 // 2  # the warm-up epoch, then 50 epochs of 2 steps
    assert toy_epochs(5, 1, 400, 16) == 5  # 25 steps an epoch: 1 + 4 epochs, the official 5
    assert toy_epochs(5, 0, 4000, 16) == 1  # at least one epoch, even when it is longer than the cap
    assert toy_epochs(10, 1, 192, 1) == 2  # the warm-up and one epoch
    assert toy_epochs(50, 1, 10, 32) == 50  # a set smaller than a batch: one step an epoch; never longer
    assert toy_epochs(3, 5, 80, 32) == 3 and toy_epochs(0, 0, 80, 32) == 0
    assert toy_epochs(200, 1, 80, 32, max_steps=10) == 6


def test_train_size_counts_the_kept_classes(toy_root, tmp_path):
    assert train_size(toy_root, "eurosat", 16, "base") == 16 * 5  # 10 classes: 5 base
    assert train_size(toy_root, "eurosat", 16, "new") == 16 * 5
    assert train_size(toy_root, "eurosat", 4, "all") == 4 * 10
    assert train_size(toy_root, "eurosat", 32, "all") == SIZES["train"] * 10  # at most the images a class has
    assert train_size(toy_root, "caltech101", 16, "base") == 0  # not written here
    assert train_size(tmp_path, "eurosat", 16, "base") == 0  # not a toy root


@pytest.mark.parametrize("method", ["coop", "mma", "kgcoop", "maple", "cocoop", "promptsrc", "clip_adapter"])
def test_every_method_gets_the_same_rule_on_its_official_values(method, toy_root, tmp_path):
    official = _cfg(method, tmp_path)  # not a toy root: the official configuration
    toy = _cfg(method, toy_root)
    epochs = toy_epochs(official.OPTIM.MAX_EPOCH, official.OPTIM.WARMUP_EPOCH, 80,
                        official.DATALOADER.TRAIN_X.BATCH_SIZE)
    assert toy.OPTIM.MAX_EPOCH == epochs <= official.OPTIM.MAX_EPOCH
    # nothing else moves but the options counted in epochs (PromptSRC's Gaussian), scaled alike
    for key in ("LR", "WARMUP_EPOCH", "NAME", "LR_SCHEDULER", "WEIGHT_DECAY"):
        assert toy.OPTIM[key] == official.OPTIM[key], key
    assert toy.DATALOADER.TRAIN_X.BATCH_SIZE == official.DATALOADER.TRAIN_X.BATCH_SIZE
    for name in toy.TRAINER:
        if name == "NAME":
            continue
        for key, value in official.TRAINER[name].items():
            if method == "promptsrc" and name == "PROMPTSRC" and key in ("GPA_MEAN", "GPA_STD"):
                factor = epochs / official.OPTIM.MAX_EPOCH
                assert toy.TRAINER[name][key] == pytest.approx(value * factor, rel=1e-12), key
            else:
                assert toy.TRAINER[name][key] == value, (name, key)
    if method == "promptsrc":
        assert epochs < official.OPTIM.MAX_EPOCH  # so the scaling above was exercised


def test_coop_cut_to_the_cap_and_the_opts_win(toy_root):
    assert _cfg("coop", toy_root).OPTIM.MAX_EPOCH == 51  # 80 images, batch 32: 2 steps an epoch
    assert _cfg("coop", toy_root, "OPTIM.MAX_EPOCH", "7").OPTIM.MAX_EPOCH == 7  # an explicit choice wins
    few = _cfg("coop", toy_root, protocol="few_shot", shots=1, subsample="all")  # 10 images: 1 step an epoch
    assert few.OPTIM.MAX_EPOCH == 50  # the official 50 epochs of the 1-shot setting fit under the cap
