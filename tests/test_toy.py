"""The toy world's datasets: every slot written in its real layout and read by the real loaders."""

from __future__ import annotations

import pytest

from datasets import toyworld as W
from datasets.build import build_dataset
from datasets.toy import TEMPLATE, build_tasks, write_toy_root
from datasets.worlds import dataset_template, world_of

SLOTS = ["caltech101", "ucf101", "oxford_pets", "imagenet", "imagenet_sketch"]
SMALL = {"train": 16, "val": 2, "test": 10}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_toy_root(root, SLOTS, sizes=SMALL)
    return root


def test_slots_load_through_the_real_loaders(toy_root):
    tasks = build_tasks()
    assert world_of(toy_root) == "toy"
    for slot in ["caltech101", "ucf101", "oxford_pets", "imagenet"]:
        data = build_dataset(slot, toy_root, num_shots=4, seed=1)
        n = len(tasks[slot].names)
        assert len(data.classnames) == n
        assert len(data.train) == 4 * n and len(data.test) == SMALL["test"] * n
        # names as the slot's layout spells them (underscores where the real JSON has them)
        assert [c.replace("_", " ").lower() for c in data.classnames] == [c.lower() for c in tasks[slot].names]
    sketch = build_dataset("imagenet_sketch", toy_root)
    assert sketch.classnames == tasks["imagenet"].names
    assert dataset_template("oxford_pets", world_of(toy_root)) == TEMPLATE


def test_held_out_compositions_only_in_the_novel_slot():
    tasks = build_tasks()
    novel = {tuple(d.values()) for d in tasks["ucf101"].fixed}
    seen = {tuple(d.values()) for d in tasks["imagenet"].fixed + tasks["food101"].fixed}
    assert novel and novel <= W.HELD_OUT
    assert not seen & W.HELD_OUT


def test_class_counts_spread_and_full_grids_share_attribute_values_between_base_and_novel():
    tasks = build_tasks()
    counts = {slot: len(task.names) for slot, task in tasks.items()}
    assert len(set(counts.values())) >= 5 and min(counts.values()) <= 12 and max(counts.values()) >= 40
    for many in ("imagenet", "sun397", "stanford_cars"):  # many classes, as the real datasets have
        assert counts[many] >= 40, counts
    assert counts["eurosat"] == 10
    for task in tasks.values():
        assert len(set(task.names)) == len(task.names)  # no class twice
    for slot in ("caltech101", "oxford_pets", "stanford_cars", "sun397", "dtd"):
        fixed = tasks[slot].fixed
        half = (len(fixed) + 1) // 2
        for key in fixed[0]:
            base, novel = {f[key] for f in fixed[:half]}, {f[key] for f in fixed[half:]}
            assert novel <= base, (slot, key, novel - base)
