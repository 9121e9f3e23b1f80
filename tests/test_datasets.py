"""Datasets: every catalogue row loads from its fake, and the official rules hold.

Expected values are written out from the rules (few-shot draw, base/new split, cache
format), not produced by the code under test.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.base import (
    DatasetError,
    Datum,
    UnsafePickleError,
    generate_fewshot,
    read_dassl_pickle,
    subsample_classes,
    write_dassl_pickle,
)
from datasets.build import build_dataset
from datasets.catalog import (
    BASE2NOVEL_DATASETS,
    CATALOG,
    DG_DATASETS,
    check_dataset,
    get_spec,
    list_datasets,
)
from datasets.synthetic import write_synthetic_dataset, write_synthetic_root

DASSL_MODULE = "dassl.data.datasets.base_dataset"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic_root(tmp_path_factory.mktemp("data"))


# --------------------------------------------------------------------------- catalogue


def test_catalog_rows():
    assert list_datasets() == [*BASE2NOVEL_DATASETS, *DG_DATASETS]
    assert len(CATALOG) == 15
    assert BASE2NOVEL_DATASETS[:3] == ("imagenet", "caltech101", "oxford_pets")
    assert get_spec("caltech101").folder == "caltech-101"
    assert get_spec("stanford_cars").images == ""
    assert get_spec("oxford_pets").template == "a photo of a {}, a type of pet."
    assert get_spec("food101").template == "a photo of {}, a type of food."
    assert get_spec("dtd").template == "{} texture."
    assert get_spec("imagenet_r").template == "a photo of a {}."
    assert all(CATALOG[k].test_only for k in DG_DATASETS)
    assert not any(CATALOG[k].test_only for k in BASE2NOVEL_DATASETS)
    assert get_spec("OxfordPets") is CATALOG["oxford_pets"]  # official DATASET.NAME works too


def test_unknown_name_suggests_close_matches(tmp_path):
    with pytest.raises(DatasetError) as e:
        get_spec("oxford_pet")
    assert str(e.value) == "Unknown dataset 'oxford_pet'. Did you mean: oxford_pets?"
    with pytest.raises(DatasetError, match="Unknown dataset 'mnist'"):
        build_dataset("mnist", tmp_path)


# --------------------------------------------------------------------------- every dataset

# name -> (classes, train, val, test per class, class names by label); written by hand
# from the layout rules and the synthetic defaults (8 / 2 / 4 images per class)
IMAGENET_NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark",
                  "electric ray", "stingray", "rooster"]
EXPECTED = {
    "imagenet": (8, 8, 4, 4, IMAGENET_NAMES),  # val = test
    "caltech101": (8, 8, 2, 4, ["face", "leopard", "motorbike", "accordion", "airplane", "anchor",
                                "ant", "barrel"]),
    "oxford_pets": (7, 8, 2, 4, ["abyssinian", "american_bulldog", "american_pit_bull_terrier",
                                 "basset_hound", "beagle", "bengal", "birman"]),
    "stanford_cars": (6, 8, 2, 4, ["2012 AM General Hummer SUV", "2012 Acura TL Sedan",
                                   "2012 Audi TTS Coupe", "2007 BMW 6 Series Convertible",
                                   "2012 Chevrolet Corvette ZR1", "2009 Dodge Ram Pickup 3500 Quad Cab"]),
    "oxford_flowers": (8, 8, 2, 4, ["pink primrose", "hard-leaved pocket orchid", "canterbury bells",
                                    "sweet pea", "english marigold", "tiger lily", "moon orchid",
                                    "bird of paradise"]),
    "food101": (7, 8, 2, 4, ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio",
                             "beef_tartare", "beet_salad", "beignets"]),
    "fgvc_aircraft": (6, 8, 2, 4, ["707-320", "727-200", "737-200", "A300B4", "ATR-42", "BAE 146-200"]),
    "sun397": (7, 8, 2, 4, ["abbey", "indoor apse", "shop bakery", "bedroom", "canyon", "dining_room",
                            "cultivated field"]),
    "dtd": (7, 8, 2, 4, ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed"]),
    "eurosat": (10, 8, 2, 4, ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land",
                              "Highway or Road", "Industrial Buildings", "Pasture Land",
                              "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]),
    "ucf101": (7, 8, 2, 4, ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Baby_Crawling",
                            "Balance_Beam", "Band_Marching", "Baseball_Pitch"]),
    # test-only: train = test, no val
    "imagenetv2": (8, 4, 0, 4, IMAGENET_NAMES),
    "imagenet_sketch": (8, 4, 0, 4, IMAGENET_NAMES),
    # A and R hold a subset of the classes, labelled 0.. in their own sorted folder list
    "imagenet_a": (6, 4, 0, 4, ["tench", "goldfish", "tiger shark", "hammerhead shark", "stingray",
                                "rooster"]),
    "imagenet_r": (6, 4, 0, 4, ["tench", "goldfish", "great white shark", "hammerhead shark",
                                "electric ray", "stingray"]),
}


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_loads(root, name):
    n, n_train, n_val, n_test, names = EXPECTED[name]
    assert check_dataset(name, root) == []
    ds = build_dataset(name, root)
    assert ds.num_classes == n
    assert ds.classnames == names
    assert (len(ds.train), len(ds.val), len(ds.test)) == (n * n_train, n * n_val, n * n_test)
    for split in (ds.train, ds.val, ds.test):
        assert {d.label for d in split} <= set(range(n))
        assert all(ds.classnames[d.label] == d.classname for d in split)
    assert {d.label for d in ds.test} == set(range(n))
    folder = os.path.join(str(root), CATALOG[name].folder)
    for d in ds.train[:3] + ds.test[-3:]:
        assert d.impath.startswith(folder + os.sep) and os.path.isfile(d.impath)
    if name == "imagenet":
        assert ds.val == ds.test
    if CATALOG[name].test_only:
        assert ds.train == ds.test and ds.val == []


def test_layout_quirks(root):
    r = str(root)
    cars = build_dataset("stanford_cars", root)
    assert {os.path.dirname(d.impath) for d in cars.test} == {os.path.join(r, "stanford_cars", "cars_test")}
    caltech = build_dataset("caltech101", root)
    airplane = [d for d in caltech.train if d.classname == "airplane"][0]
    assert os.path.basename(os.path.dirname(airplane.impath)) == "airplanes"  # renamed in the JSON
    assert all("BACKGROUND_Google" not in d.impath for d in caltech.test)
    sun = build_dataset("sun397", root)
    apse = [d for d in sun.train if d.classname == "indoor apse"][0]
    assert os.path.dirname(apse.impath) == os.path.join(r, "sun397", "SUN397", "a", "apse", "indoor")
    fgvc = build_dataset("fgvc_aircraft", root)
    bae = [d for d in fgvc.train if d.classname == "BAE 146-200"][0]
    assert bae.label == 5 and os.path.dirname(bae.impath) == os.path.join(r, "fgvc_aircraft", "images")
    v2 = build_dataset("imagenetv2", root)
    assert all(os.path.basename(os.path.dirname(d.impath)) == str(d.label) for d in v2.test)
    a = build_dataset("imagenet_a", root)
    assert [d.label for d in a.test if "/n01491361/" in d.impath][0] == 2  # tiger shark: 3rd folder
    assert os.path.isfile(os.path.join(r, "imagenet-adversarial", "imagenet-a", "README.txt"))


def test_synthetic_images_are_learnable_and_varied(root):
    ds = build_dataset("dtd", root)

    def feature(d):
        return np.asarray(Image.open(d.impath).convert("RGB"), dtype=np.float32).mean(axis=(0, 1))

    centroids = {}
    for label in range(ds.num_classes):
        centroids[label] = np.mean([feature(d) for d in ds.train if d.label == label], axis=0)
    correct = sum(
        min(centroids, key=lambda c: np.linalg.norm(feature(d) - centroids[c])) == d.label for d in ds.test
    )
    assert correct / len(ds.test) >= 0.9  # mean colour alone separates the classes
    sizes = {Image.open(d.impath).size for d in ds.train}
    assert (32, 32) in sizes and any(w != h for w, h in sizes)


def test_synthetic_is_deterministic(tmp_path):
    a = write_synthetic_dataset("eurosat", tmp_path / "a", n_classes=3, seed=5)
    b = write_synthetic_dataset("eurosat", tmp_path / "b", n_classes=3, seed=5)
    c = write_synthetic_dataset("eurosat", tmp_path / "c", n_classes=3, seed=6)
    rel = "2750/Forest/Forest_1.jpg"
    assert (a / rel).read_bytes() == (b / rel).read_bytes() != (c / rel).read_bytes()
    assert (a / "split_zhou_EuroSAT.json").read_text() == (b / "split_zhou_EuroSAT.json").read_text()


def test_flowers_json_lists_labels_out_of_order(root):
    split = json.loads((root / "oxford_flowers" / "split_zhou_OxfordFlowers.json").read_text())
    first_seen = list(dict.fromkeys(label for _, label, _ in split["train"]))
    assert first_seen == [0, 3, 6, 1, 4, 7, 2, 5]
    assert split["train"][0][0].startswith("image_")


# --------------------------------------------------------------------------- few-shot rules


def _items(labels: list[int]) -> list[Datum]:
    return [Datum(f"/x/{i}.jpg", y, f"c{y}") for i, y in enumerate(labels)]


def test_fewshot_visits_labels_in_order_of_first_appearance():
    data = _items([2, 0, 2, 1, 0, 2, 1, 0, 1, 2, 0, 1])
    g2, g0, g1 = ([d for d in data if d.label == y] for y in (2, 0, 1))
    rng = random.Random(7)
    expected = rng.sample(g2, 2) + rng.sample(g0, 2) + rng.sample(g1, 2)
    out = generate_fewshot(data, 2, random.Random(7))
    assert out == expected
    assert [d.label for d in out] == [2, 2, 0, 0, 1, 1]


def test_fewshot_small_class_takes_all_without_randomness():
    data = _items([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    g0, g1, g2 = data[0:4], data[4:6], data[6:10]
    rng = random.Random(3)
    expected = rng.sample(g0, 3) + g1 + rng.sample(g2, 3)  # no draw for the 2-item class
    assert generate_fewshot(data, 3, random.Random(3)) == expected
    assert generate_fewshot(data, 0, random.Random(3)) == data
    assert generate_fewshot(data, -1, random.Random(3)) == data


def test_build_draws_train_then_val_from_one_stream(tmp_path):
    write_synthetic_dataset("oxford_flowers", tmp_path)
    split = json.loads((tmp_path / "oxford_flowers" / "split_zhou_OxfordFlowers.json").read_text())
    order = [0, 3, 6, 1, 4, 7, 2, 5]  # first appearance in the JSON (see the test above)

    def rows(key, label):
        return [r[0] for r in split[key] if r[1] == label]

    rng = random.Random(2)
    train = [p for y in order for p in rng.sample(rows("train", y), 3)]
    val = [p for y in order for p in rows("val", y)]  # min(3, 4) > 2 items: all, file order
    ds = build_dataset("oxford_flowers", tmp_path, num_shots=3, seed=2)
    assert [os.path.basename(d.impath) for d in ds.train] == train
    assert [os.path.basename(d.impath) for d in ds.val] == val

    # K=2: val takes min(2, 4) = 2 of 2 items, which still goes through random.sample
    rng = random.Random(2)
    train = [p for y in order for p in rng.sample(rows("train", y), 2)]
    val = [p for y in order for p in rng.sample(rows("val", y), 2)]
    ds = build_dataset("oxford_flowers", tmp_path, num_shots=2, seed=2)
    assert [os.path.basename(d.impath) for d in ds.train] == train
    assert [os.path.basename(d.impath) for d in ds.val] == val
    assert len(ds.test) == 8 * 4  # test is never sampled


def test_val_shots_are_capped_at_four(tmp_path):
    write_synthetic_dataset("dtd", tmp_path, n_classes=3, n_train=9, n_val=6)
    split = json.loads((tmp_path / "dtd" / "split_zhou_DescribableTextures.json").read_text())
    rng = random.Random(1)
    train = [p for y in (0, 1, 2) for p in rng.sample([r[0] for r in split["train"] if r[1] == y], 8)]
    val = [p for y in (0, 1, 2) for p in rng.sample([r[0] for r in split["val"] if r[1] == y], 4)]
    ds = build_dataset("dtd", tmp_path, num_shots=8, seed=1)
    root = str(tmp_path / "dtd" / "images") + os.sep
    assert [d.impath.removeprefix(root) for d in ds.train] == train
    assert [d.impath.removeprefix(root) for d in ds.val] == val


def test_imagenet_draws_train_only(tmp_path):
    write_synthetic_dataset("imagenet", tmp_path, n_classes=4)
    ds = build_dataset("imagenet", tmp_path, num_shots=2, seed=1, subsample="base")
    assert len(ds.train) == 2 * 2 and ds.val == ds.test and len(ds.test) == 2 * 4
    cache = tmp_path / "imagenet" / "split_fewshot" / "shot_2-seed_1.pkl"
    assert list(read_dassl_pickle(cache, tmp_path / "imagenet")) == ["train"]
    assert (tmp_path / "imagenet" / "preprocessed.pkl").is_file()
    # the full list comes back from preprocessed.pkl unchanged
    again = build_dataset("imagenet", tmp_path)
    assert len(again.train) == 4 * 8 and again.classnames == IMAGENET_NAMES[:4]


# --------------------------------------------------------------------------- subsample


def test_subsample_37_classes():
    data = _items(list(range(37)))
    (base,) = subsample_classes(data, subsample="base")
    (new,) = subsample_classes(data, subsample="new")
    assert len(base) == 19 and len(new) == 18
    assert [d.label for d in base] == list(range(19))
    assert [d.label for d in new] == list(range(18))
    assert new[0].classname == "c19" and new[0].impath == "/x/19.jpg"


def test_subsample_labels_from_first_split_and_order_kept():
    train = _items([6, 0, 4, 2, 6, 0])  # labels 0, 2, 4, 6 -> base {0, 2}, new {4, 6}
    test = _items([7, 6, 5, 4, 3, 2, 1, 0])
    b_train, b_test = subsample_classes(train, test, subsample="base")
    n_train, n_test = subsample_classes(train, test, subsample="new")
    assert [(d.label, d.classname) for d in b_train] == [(0, "c0"), (1, "c2"), (0, "c0")]
    assert [(d.label, d.classname) for d in b_test] == [(1, "c2"), (0, "c0")]  # odd labels dropped
    assert [(d.label, d.classname) for d in n_train] == [(1, "c6"), (0, "c4"), (1, "c6")]
    assert [(d.label, d.classname) for d in n_test] == [(1, "c6"), (0, "c4")]
    assert subsample_classes(train, test, subsample="all") == (train, test)
    with pytest.raises(ValueError):
        subsample_classes(train, subsample="novel")


def test_subsample_even_and_odd_counts():
    for n, n_base in ((10, 5), (7, 4), (1, 1)):
        (base,) = subsample_classes(_items(list(range(n))), subsample="base")
        (new,) = subsample_classes(_items(list(range(n))), subsample="new")
        assert (len(base), len(new)) == (n_base, n - n_base)


def test_build_base_and_new_share_one_draw(root, tmp_path):
    write_synthetic_dataset("oxford_pets", tmp_path)  # 7 classes -> 4 base, 3 new
    base = build_dataset("oxford_pets", tmp_path, num_shots=2, seed=1, subsample="base")
    new = build_dataset("oxford_pets", tmp_path, num_shots=2, seed=1, subsample="new")
    full = build_dataset("oxford_pets", tmp_path, num_shots=2, seed=1)
    assert base.classnames == EXPECTED["oxford_pets"][4][:4]
    assert new.classnames == EXPECTED["oxford_pets"][4][4:]
    assert [d.impath for d in full.train] == [d.impath for d in base.train + new.train]
    assert len(new.test) == 3 * 4 and {d.label for d in new.test} == {0, 1, 2}
    # one draw, and its checksum file
    assert sorted(os.listdir(tmp_path / "oxford_pets" / "split_fewshot")) == ["shot_2-seed_1.pkl",
                                                                              "shot_2-seed_1.pkl.crc32.json"]


# --------------------------------------------------------------------------- caches


@pytest.fixture
def fake_dassl():
    """The official ``Datum`` class in a throw-away module tree, removed afterwards."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", DASSL_MODULE]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)

    class Datum:  # as the official class: private attributes, file check in __init__
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


def _official_pickle(fake_dassl, path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def test_cache_written_in_official_path_and_format(tmp_path, fake_dassl):
    write_synthetic_dataset("dtd", tmp_path, n_classes=3)
    ds = build_dataset("dtd", tmp_path, num_shots=2, seed=3)
    cache = tmp_path / "dtd" / "split_fewshot" / "shot_2-seed_3.pkl"
    assert ds.fewshot_cache == str(cache)
    raw = cache.read_bytes()
    assert raw[:2] == b"\x80" + bytes([pickle.HIGHEST_PROTOCOL])
    official = pickle.loads(raw)  # what the official code sees
    assert list(official) == ["train", "val"]
    first = official["train"][0]
    assert type(first) is fake_dassl
    assert vars(first) == {"_impath": ds.train[0].impath, "_label": ds.train[0].label,
                           "_domain": 0, "_classname": ds.train[0].classname}
    assert os.path.isabs(first._impath)
    back = read_dassl_pickle(cache, tmp_path / "dtd")
    assert back == {"train": ds.train, "val": ds.val}
    assert not list(cache.parent.glob("*.tmp"))  # the atomic write left nothing behind


def test_existing_cache_is_used_as_is(tmp_path):
    write_synthetic_dataset("dtd", tmp_path, n_classes=3)
    full = build_dataset("dtd", tmp_path)
    chosen = {"train": [full.train[-1], full.train[0]], "val": [full.val[1]]}  # no rule gives this
    write_dassl_pickle(chosen, tmp_path / "dtd" / "split_fewshot" / "shot_16-seed_5.pkl")
    ds = build_dataset("dtd", tmp_path, num_shots=16, seed=5)
    assert ds.train == chosen["train"] and ds.val == chosen["val"]
    assert len(ds.test) == len(full.test)


def test_pickle_from_another_machine_is_rebased(tmp_path, fake_dassl):
    write_synthetic_dataset("oxford_pets", tmp_path, n_classes=2)
    other = "/data/other_machine/oxford_pets/images/"
    obj = {
        "train": [fake_dassl(other + "Abyssinian_1.jpg", 0, 0, "abyssinian"),
                  fake_dassl(other + "american_bulldog_2.jpg", 1, 0, "american_bulldog")],
        "val": [fake_dassl("images/Abyssinian_9.jpg", 0, 0, "abyssinian")],  # relative
    }
    _official_pickle(fake_dassl, tmp_path / "oxford_pets" / "split_fewshot" / "shot_1-seed_1.pkl", obj)
    for n in ["dassl", "dassl.data", "dassl.data.datasets", DASSL_MODULE]:
        del sys.modules[n]  # reading must not need the official package
    ds = build_dataset("oxford_pets", tmp_path, num_shots=1, seed=1)
    images = str(tmp_path / "oxford_pets" / "images")
    assert [d.impath for d in ds.train] == [os.path.join(images, "Abyssinian_1.jpg"),
                                            os.path.join(images, "american_bulldog_2.jpg")]
    assert [d.impath for d in ds.val] == [os.path.join(images, "Abyssinian_9.jpg")]
    assert ds.classnames == ["abyssinian", "american_bulldog"]
    assert all(os.path.isfile(d.impath) for d in ds.train + ds.val)


def test_rebase_windows_paths_and_repeated_folder_names(tmp_path, fake_dassl):
    path = tmp_path / "x.pkl"
    _official_pickle(fake_dassl, path, {"train": [
        fake_dassl("C:\\data\\imagenet\\images\\train\\n01\\a.JPEG", 0, 0, "tench"),
        fake_dassl("/mnt/imagenet/imagenet/images/val/n01/b.JPEG", 0, 0, "tench"),
    ]})
    out = read_dassl_pickle(path, tmp_path / "imagenet", images="images")
    base = str(tmp_path / "imagenet")
    assert [d.impath for d in out["train"]] == [os.path.join(base, "images", "train", "n01", "a.JPEG"),
                                               os.path.join(base, "images", "val", "n01", "b.JPEG")]


def test_official_preprocessed_imagenet_pickle_is_read(tmp_path, fake_dassl):
    write_synthetic_dataset("imagenet", tmp_path, n_classes=2, n_train=2, n_test=1)
    prefix = "/data/other_machine/imagenet/images/"
    obj = {"train": [fake_dassl(prefix + "train/n01440764/n01440764_1000.JPEG", 0, 0, "tench"),
                     fake_dassl(prefix + "train/n01443537/n01443537_1000.JPEG", 1, 0, "goldfish")],
           "test": [fake_dassl(prefix + "val/n01443537/ILSVRC2012_val_00000002.JPEG", 1, 0, "goldfish")]}
    _official_pickle(fake_dassl, tmp_path / "imagenet" / "preprocessed.pkl", obj)
    ds = build_dataset("imagenet", tmp_path)
    assert len(ds.train) == 2 and len(ds.test) == 1 and ds.val == ds.test
    assert all(os.path.isfile(d.impath) for d in ds.train + ds.test)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_other_classes_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": [_Evil()]}))
    with pytest.raises(UnsafePickleError, match="refusing to load '(posix|os|nt).system'"):
        read_dassl_pickle(path, tmp_path / "oxford_pets")
    assert not (tmp_path / "pwned.txt").exists()
    path.write_bytes(pickle.dumps({"train": [eval]}))
    with pytest.raises(DatasetError, match="builtins.eval"):
        read_dassl_pickle(path, tmp_path / "oxford_pets")
    # through build_dataset the same file is refused, not executed
    write_synthetic_dataset("dtd", tmp_path, n_classes=2)
    (tmp_path / "dtd" / "split_fewshot").mkdir()
    (tmp_path / "dtd" / "split_fewshot" / "shot_1-seed_1.pkl").write_bytes(
        pickle.dumps({"train": [_Evil()], "val": []}))
    with pytest.raises(DatasetError, match="shot_1-seed_1.pkl"):
        build_dataset("dtd", tmp_path, num_shots=1, seed=1)
    assert not (tmp_path / "pwned.txt").exists()


def test_variants_write_no_cache(tmp_path):
    write_synthetic_dataset("imagenet_sketch", tmp_path, n_classes=2)
    ds = build_dataset("imagenet_sketch", tmp_path, num_shots=16, seed=1, subsample="base")
    assert ds.num_classes == 2 and len(ds.test) == 2 * 4  # official variants ignore both
    assert not (tmp_path / "imagenet-sketch" / "split_fewshot").exists()


def test_no_shots_means_no_cache(tmp_path):
    write_synthetic_dataset("eurosat", tmp_path, n_classes=2)
    build_dataset("eurosat", tmp_path, num_shots=0)
    assert not (tmp_path / "eurosat" / "split_fewshot").exists()


# --------------------------------------------------------------------------- errors


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError) as e:
        build_dataset("dtd", tmp_path)
    msg = str(e.value)
    assert f"missing dataset folder: {tmp_path / 'dtd'}" in msg
    assert "split_zhou_DescribableTextures.json" in msg and "images/" in msg  # the layout
    assert "README" in msg


def test_missing_split_file_and_image_root(tmp_path):
    write_synthetic_dataset("dtd", tmp_path, n_classes=2)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    (tmp_path / "dtd" / "images").rename(tmp_path / "dtd" / "imgs")
    problems = check_dataset("dtd", tmp_path)
    assert problems == [f"missing folder: {tmp_path / 'dtd' / 'images'}",
                        f"missing file: {tmp_path / 'dtd' / 'split_zhou_DescribableTextures.json'}"]
    with pytest.raises(DatasetError, match="missing file: .*split_zhou_DescribableTextures.json"):
        build_dataset("dtd", tmp_path)


def test_missing_fgvc_text_file(tmp_path):
    write_synthetic_dataset("fgvc_aircraft", tmp_path, n_classes=2)
    (tmp_path / "fgvc_aircraft" / "images_variant_val.txt").unlink()
    with pytest.raises(DatasetError, match="images_variant_val.txt"):
        build_dataset("fgvc_aircraft", tmp_path)


def test_broken_split_json(tmp_path):
    write_synthetic_dataset("eurosat", tmp_path, n_classes=2)
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text("{not json")
    with pytest.raises(DatasetError, match="split_zhou_EuroSAT.json could not be read"):
        build_dataset("eurosat", tmp_path)


def test_flat_imagenet_val_folder_is_reported(tmp_path):
    write_synthetic_dataset("imagenet", tmp_path, n_classes=2)
    val = tmp_path / "imagenet" / "images" / "val"
    for jpg in list(val.rglob("*.JPEG")):
        jpg.rename(val / jpg.name)
    for d in [p for p in val.iterdir() if p.is_dir()]:
        d.rmdir()
    with pytest.raises(DatasetError, match="one folder per wnid"):
        build_dataset("imagenet", tmp_path)


def test_variant_folder_missing_from_classnames(tmp_path):
    write_synthetic_dataset("imagenet_r", tmp_path, n_classes=3)
    (tmp_path / "imagenet-rendition" / "imagenet-r" / "n99999999").mkdir()
    with pytest.raises(DatasetError, match="classnames.txt"):
        build_dataset("imagenet_r", tmp_path)
