"""The fifteen datasets of the few-shot CLIP benchmarks, one row each.

A row says where a dataset sits under the data root (the folder names of the official
code, so an existing data folder works unchanged), where its images are, which split file
it reads and its zero-shot prompt template. Eleven rows share one JSON reader; FGVC
Aircraft, ImageNet and the four ImageNet variants name a small reader of their own that
keeps the official quirks (text split files, folder scans, unsorted ``listdir``).
ImageNet caches its folder scan in ``preprocessed.pkl`` with a checksum file beside it; a
cache that fails it is scanned again and rewritten.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from datasets.base import (
    DamagedCacheError,
    DatasetError,
    Datum,
    Splits,
    label_names,
    read_dassl_pickle,
    read_split_json,
    write_dassl_pickle,
)

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Spec:
    """Where one dataset lives and how it is read."""

    folder: str  # dataset_dir under the data root
    images: str  # image root relative to `folder`; "" = the folder itself
    split: str | None  # split JSON in `folder`, None where `reader` reads other files
    dassl_name: str  # DATASET.NAME in the official configs
    reader: Callable[..., Splits] | None = None  # (spec, dataset_dir, write_caches) or None: the JSON reader
    template: str = "a photo of a {}."  # zero-shot prompt of the official zero-shot CLIP
    test_only: bool = False  # ImageNet variants: train = test = every image, no val
    val_is_test: bool = False  # ImageNet: no val split, val = test, few-shot draws train only
    classes: int = 0  # classes in the full dataset (for messages and sanity checks)
    needs: tuple[str, ...] = ()  # further files ("x.txt") or folders ("x/") the reader opens
    note: str = ""  # what the layout tree cannot show

    def required(self) -> tuple[str, ...]:
        """Paths relative to ``folder`` that must exist; folders end with ``/``."""
        paths = [self.images.rstrip("/") + "/"] if self.images else []
        if self.split:
            paths.append(self.split)
        paths = list(dict.fromkeys([*paths, *self.needs]))
        # a folder whose sub-folder is listed anyway ("images/" for "images/train/") adds nothing
        covered = {p for p in paths if p.endswith("/") and any(q != p and q.startswith(p) for q in paths)}
        return tuple(p for p in paths if p not in covered)

    def read(self, dataset_dir: str, *, write_caches: bool = True) -> Splits:
        """All images of every split, in file order, with original labels (``write_caches``:
        whether a reader may write its cache, ImageNet's file lists)."""
        if self.reader is not None:
            return self.reader(self, dataset_dir, write_caches)
        return read_split_json(os.path.join(dataset_dir, self.split), image_root(self, dataset_dir))


def image_root(spec: Spec, dataset_dir: str) -> str:
    return os.path.join(dataset_dir, spec.images) if spec.images else dataset_dir


# --------------------------------------------------------------------------- quirky readers


def _listdir_nohidden(path: str) -> list[str]:
    # unsorted on purpose: the official scan keeps the file system's order (see ImageNet)
    return [n for n in os.listdir(path) if not n.startswith(".")]


def _subfolders(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DatasetError(f"Could not read {path}: {e}") from None


def read_classnames(path: str) -> OrderedDict[str, str]:
    """``classnames.txt``: ``<wnid> <class name with spaces>`` per line, file order kept."""
    names: OrderedDict[str, str] = OrderedDict()
    for line in _read_lines(path):
        wnid, _, name = line.partition(" ")
        names[wnid] = name
    return names


def _scan(image_dir: str, folders: list[str], labels: list[int], names: list[str]) -> list[Datum]:
    """Every image of each class folder, folders in the given order, files unsorted."""
    items = []
    for folder, label, name in zip(folders, labels, names):
        class_dir = os.path.join(image_dir, folder)
        try:
            files = _listdir_nohidden(class_dir)
        except OSError as e:
            raise DatasetError(f"Could not list the class folder {class_dir}: {e}") from None
        items.extend(Datum(os.path.join(class_dir, f), label, name) for f in files)
    return items


def _names_for(folders: list[str], classnames: dict[str, str], where: str) -> list[str]:
    missing = [f for f in folders if f not in classnames]
    if missing:
        raise DatasetError(
            f"{len(missing)} class folder(s) in {where} are not listed in classnames.txt "
            f"(first: {missing[0]!r}).\nCopy the ImageNet classnames.txt into this dataset's folder."
        )
    return [classnames[f] for f in folders]


def _read_fgvc(spec: Spec, dataset_dir: str, write_caches: bool = True) -> Splits:
    """Label = line index in ``variants.txt``; each split line is ``<image id> <variant>``."""
    variants = _read_lines(os.path.join(dataset_dir, "variants.txt"))
    label_of = {name: i for i, name in enumerate(variants)}
    image_dir = image_root(spec, dataset_dir)

    def read(split: str) -> list[Datum]:
        path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
        items = []
        for line in _read_lines(path):
            image_id, _, name = line.partition(" ")
            if name not in label_of:
                raise DatasetError(f"{path}: variant {name!r} (image {image_id}) is not in variants.txt.")
            items.append(Datum(os.path.join(image_dir, image_id + ".jpg"), label_of[name], name))
        return items

    return read("train"), read("val"), read("test")


def _read_imagenet(spec: Spec, dataset_dir: str, write_caches: bool = True) -> Splits:
    """``preprocessed.pkl`` if present, else scan ``images/{train,val}`` and write it
    (``write_caches``), only when the scan is sound: the same class folders in both
    splits, none of them empty.  A cache written from a broken folder would outlive its
    fix.  A cache that fails the checksum file the harness wrote beside it is warned
    about once and replaced by a new scan (the folders are the source of truth), written
    over it; one without a checksum file (written by the official code) is read as it is."""
    cache = os.path.join(dataset_dir, "preprocessed.pkl")
    if os.path.exists(cache):
        log.info("Loading ImageNet file lists from %s", cache)
        try:
            data = read_dassl_pickle(cache, dataset_dir, spec.images)
        except DamagedCacheError as damage:
            log.warning("The ImageNet file lists %s are damaged (%s); scanning the folders again%s.", cache,
                        damage.problem, " and rewriting them" if write_caches else "")
        else:
            if "train" not in data or "test" not in data:
                raise DatasetError(f"{cache} lacks the train/test lists; delete it so that it is rebuilt.")
            return data["train"], [], data["test"]
    classnames = read_classnames(os.path.join(dataset_dir, "classnames.txt"))
    splits = []
    for split in ("train", "val"):  # the official val set is the test set
        split_dir = os.path.join(image_root(spec, dataset_dir), split)
        folders = _subfolders(split_dir)
        names = _names_for(folders, classnames, split_dir)
        splits.append(_scan(split_dir, folders, list(range(len(folders))), names))
    train, test = splits
    if not write_caches or _imagenet_scan_problems(image_root(spec, dataset_dir), train, test):
        return train, [], test
    try:
        write_dassl_pickle({"train": train, "test": test}, cache)
    except OSError as e:
        log.warning("Could not write %s (%s); the folders will be scanned again next time", cache, e)
    return train, [], test


def _imagenet_scan_problems(image_dir: str, train: list[Datum], test: list[Datum]) -> list[str]:
    """Why a scan of ImageNet's folders must not be cached: class folders present in one
    split only, or empty (a partly extracted archive)."""
    problems = []
    train_names, test_names = set(label_names(train).values()), set(label_names(test).values())
    for split, names in (("train", train_names), ("val", test_names)):
        folders = _subfolders(os.path.join(image_dir, split))
        empty = len(folders) - len(names)
        if empty:
            problems.append(f"{empty} class folder(s) of {os.path.join(image_dir, split)} hold no image")
    if train_names != test_names:
        problems.append(f"{len(train_names ^ test_names)} class(es) have images in only one of train and val")
    return problems


def _read_imagenetv2(spec: Spec, dataset_dir: str, write_caches: bool = True) -> Splits:
    """Folders ``0..N-1``; class name = the label-th line of ``classnames.txt`` (file order)."""
    classnames = read_classnames(os.path.join(dataset_dir, "classnames.txt"))
    image_dir = image_root(spec, dataset_dir)
    labels = list(range(len(classnames)))  # the official loop runs over range(1000)
    data = _scan(image_dir, [str(i) for i in labels], labels, list(classnames.values()))
    return [], [], data


IGNORED_ENTRIES = ("README.txt",)  # shipped inside the ImageNet-A/-R image folders


def _read_wnid_folders(spec: Spec, dataset_dir: str, write_caches: bool = True) -> Splits:
    """Sorted wnid folders; label = index in that sorted list (200-way for A and R)."""
    classnames = read_classnames(os.path.join(dataset_dir, "classnames.txt"))
    image_dir = image_root(spec, dataset_dir)
    folders = [f for f in _subfolders(image_dir) if f not in IGNORED_ENTRIES]
    names = _names_for(folders, classnames, image_dir)
    return [], [], _scan(image_dir, folders, list(range(len(folders))), names)


# --------------------------------------------------------------------------- the table

_VARIANT = dict(split=None, reader=_read_wnid_folders, test_only=True, needs=("classnames.txt",))

CATALOG: dict[str, Spec] = {
    # 1,000 classes, 1.28M train / 50,000 val (= test); "ImageNet: A Large-Scale
    # Hierarchical Image Database", CVPR 2009
    "imagenet": Spec(
        folder="imagenet", images="images", split=None, dassl_name="ImageNet",
        reader=_read_imagenet, val_is_test=True, classes=1000,
        needs=("images/train/", "images/val/", "classnames.txt"),
        note="images/{train,val}/<wnid>/*.JPEG: the val images sorted into one folder per wnid",
    ),
    # 100 classes, 4,128 / 1,649 / 2,465; "Learning Generative Visual Models from Few
    # Training Examples", CVPR Workshops 2004
    "caltech101": Spec(folder="caltech-101", images="101_ObjectCategories",
                       split="split_zhou_Caltech101.json", dassl_name="Caltech101", classes=100),
    # 37 classes, 2,944 / 736 / 3,669; "Cats and Dogs", CVPR 2012
    "oxford_pets": Spec(folder="oxford_pets", images="images", split="split_zhou_OxfordPets.json",
                        dassl_name="OxfordPets", template="a photo of a {}, a type of pet.", classes=37),
    # 196 classes, 6,509 / 1,635 / 8,041; "3D Object Representations for Fine-Grained
    # Categorization", ICCV Workshops 2013. JSON paths start with cars_train/ or cars_test/
    "stanford_cars": Spec(folder="stanford_cars", images="", split="split_zhou_StanfordCars.json",
                          dassl_name="StanfordCars", classes=196,
                          needs=("cars_train/", "cars_test/")),
    # 102 classes, 4,093 / 1,633 / 2,463; "Automated Flower Classification over a Large
    # Number of Classes", ICVGIP 2008
    "oxford_flowers": Spec(folder="oxford_flowers", images="jpg", split="split_zhou_OxfordFlowers.json",
                           dassl_name="OxfordFlowers", template="a photo of a {}, a type of flower.",
                           classes=102),
    # 101 classes, 50,500 / 20,200 / 30,300; "Food-101: Mining Discriminative Components
    # with Random Forests", ECCV 2014
    "food101": Spec(folder="food-101", images="images", split="split_zhou_Food101.json",
                    dassl_name="Food101", template="a photo of {}, a type of food.", classes=101),
    # 100 classes, 3,334 / 3,333 / 3,333; "Fine-Grained Visual Classification of
    # Aircraft", arXiv 1306.5151, 2013. No JSON: the official variant text files
    "fgvc_aircraft": Spec(folder="fgvc_aircraft", images="images", split=None, dassl_name="FGVCAircraft",
                          reader=_read_fgvc, template="a photo of a {}, a type of aircraft.", classes=100,
                          needs=("variants.txt", "images_variant_train.txt",
                                 "images_variant_val.txt", "images_variant_test.txt")),
    # 397 classes, 15,880 / 3,970 / 19,850; "SUN Database: Large-scale Scene Recognition
    # from Abbey to Zoo", CVPR 2010
    "sun397": Spec(folder="sun397", images="SUN397", split="split_zhou_SUN397.json",
                   dassl_name="SUN397", classes=397),
    # 47 classes, 2,820 / 1,128 / 1,692; "Describing Textures in the Wild", CVPR 2014
    "dtd": Spec(folder="dtd", images="images", split="split_zhou_DescribableTextures.json",
                dassl_name="DescribableTextures", template="{} texture.", classes=47),
    # 10 classes, 13,500 / 5,400 / 8,100; "EuroSAT: A Novel Dataset and Deep Learning
    # Benchmark for Land Use and Land Cover Classification", IEEE J-STARS 2019
    "eurosat": Spec(folder="eurosat", images="2750", split="split_zhou_EuroSAT.json", dassl_name="EuroSAT",
                    template="a centered satellite photo of {}.", classes=10),
    # 101 classes, 7,639 / 1,898 / 3,783 middle frames; "UCF101: A Dataset of 101 Human
    # Actions Classes From Videos in The Wild", arXiv 1212.0402, 2012
    "ucf101": Spec(folder="ucf101", images="UCF-101-midframes", split="split_zhou_UCF101.json",
                   dassl_name="UCF101", template="a photo of a person doing {}.", classes=101),
    # 1,000 classes, 10,000 test; "Do ImageNet Classifiers Generalize to ImageNet?", ICML 2019
    "imagenetv2": Spec(folder="imagenetv2", images="imagenetv2-matched-frequency-format-val",
                       dassl_name="ImageNetV2", classes=1000,
                       note="class folders are named 0..999 (the ImageNet label)",
                       **{**_VARIANT, "reader": _read_imagenetv2}),
    # 1,000 classes, 50,889 test; "Learning Robust Global Representations by Penalizing
    # Local Predictive Power", NeurIPS 2019
    "imagenet_sketch": Spec(folder="imagenet-sketch", images="images", dassl_name="ImageNetSketch",
                            classes=1000, note="images/<wnid>/*.JPEG", **_VARIANT),
    # 200 classes, 7,500 test; "Natural Adversarial Examples", CVPR 2021. 200-way labels
    "imagenet_a": Spec(folder="imagenet-adversarial", images="imagenet-a", dassl_name="ImageNetA",
                       classes=200, note="imagenet-a/<wnid>/*.jpg (200 wnids)", **_VARIANT),
    # 200 classes, 30,000 test; "The Many Faces of Robustness", ICCV 2021. 200-way labels
    "imagenet_r": Spec(folder="imagenet-rendition", images="imagenet-r", dassl_name="ImageNetR",
                       classes=200, note="imagenet-r/<wnid>/*.jpg (200 wnids)", **_VARIANT),
}

# the papers' order (base-to-novel tables; cross-dataset targets are these minus imagenet)
BASE2NOVEL_DATASETS: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)
CROSS_DATASET_TARGETS: tuple[str, ...] = BASE2NOVEL_DATASETS[1:]
DG_DATASETS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


# --------------------------------------------------------------------------- look-up


class UnknownDatasetError(DatasetError, ValueError):
    """A dataset name that is not in the catalogue."""


def list_datasets() -> list[str]:
    """Registry keys in the papers' order (base-to-novel datasets, then the variants)."""
    return list(CATALOG)


def _plain(name: str) -> str:
    """A spelling without case, underscores, hyphens or spaces: OxfordPets, oxford-pets -> oxfordpets."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_name(name: str) -> str:
    """The registry key for ``name``; official ``DATASET.NAME`` values (``OxfordPets``) and
    spellings that differ only in case, underscores, hyphens or spaces are accepted too."""
    if name in CATALOG:
        return name
    by_alias = {s.dassl_name.lower(): k for k, s in CATALOG.items()}
    plain = {**{_plain(k): k for k in CATALOG}, **{_plain(s.dassl_name): k for k, s in CATALOG.items()}}
    key = by_alias.get(name.lower()) or plain.get(_plain(name))
    if key:
        return key
    close = _close_matches(name.lower(), {**{k: k for k in CATALOG}, **by_alias})
    hint = f"Did you mean: {', '.join(close)}?" if close else f"Known datasets: {', '.join(CATALOG)}."
    raise UnknownDatasetError(f"Unknown dataset {name!r}. {hint}")


def _close_matches(query: str, candidates: dict[str, str], cutoff: float = 0.6) -> list[str]:
    """Keys whose spelling is close to ``query``; only those nearly as close as the best."""
    scored: dict[str, float] = {}
    for spelling, key in candidates.items():
        ratio = difflib.SequenceMatcher(None, query, spelling).ratio()
        scored[key] = max(ratio, scored.get(key, 0.0))
    for key in candidates.values():  # "imagenet_s" should find imagenet_sketch
        if len(query) >= 3 and key.startswith(query):
            scored[key] = 1.0
    best = max(scored.values(), default=0.0)
    ranked = sorted(scored, key=scored.get, reverse=True)
    return [k for k in ranked if scored[k] >= max(cutoff, best - 0.1)][:3]


def get_spec(name: str) -> Spec:
    """The catalogue row of ``name``; an unknown name raises with close matches."""
    return CATALOG[resolve_name(name)]


# --------------------------------------------------------------------------- checking


def check_dataset(name: str, root: str | Path) -> list[str]:
    """Problems that would stop ``name`` from loading under ``root`` (empty when ready).

    Only folders and index files are looked at, not every image, so a whole sweep can be
    checked up front in a moment.
    """
    spec = get_spec(name)
    dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(str(root))), spec.folder)
    if not os.path.isdir(dataset_dir):
        return [f"missing dataset folder: {dataset_dir}"]
    problems = []
    for rel in spec.required():
        path = os.path.join(dataset_dir, rel.rstrip("/"))
        if rel.endswith("/") and not os.path.isdir(path):
            problems.append(f"missing folder: {path}")
        elif not rel.endswith("/") and not os.path.isfile(path):
            problems.append(f"missing file: {path}")
    if spec.val_is_test and not problems:
        problems += _check_imagenet_val(dataset_dir)
    return problems


def _check_imagenet_val(dataset_dir: str) -> list[str]:
    # the official flat val archive loads as zero classes; catch it before a long run
    if os.path.exists(os.path.join(dataset_dir, "preprocessed.pkl")):
        return []
    val = os.path.join(dataset_dir, "images", "val")
    with os.scandir(val) as entries:
        if any(e.is_dir() for e in entries):
            return []
    return [f"{val} has no class sub-folders: the val images must be sorted into one folder per wnid"]


def layout_tree(name: str, root: str | Path) -> str:
    """A short tree of what ``name`` needs under ``root``."""
    spec = get_spec(name)
    rows = [f"{os.path.abspath(os.path.expanduser(str(root)))}/", f"└── {spec.folder}/"]
    required = spec.required() or ("",)
    for i, rel in enumerate(required):
        branch = "└──" if i == len(required) - 1 else "├──"
        rows.append(f"    {branch} {rel}")
    if spec.note:
        rows.append(f"    ({spec.note})")
    return "\n".join(rows)


def dataset_error(name: str, root: str | Path, problems: list[str]) -> DatasetError:
    """A ``DatasetError`` listing ``problems`` with the expected layout and the fix."""
    spec = get_spec(name)
    where = os.path.join(os.path.abspath(os.path.expanduser(str(root))), spec.folder)
    lines = [f"Dataset {name!r} ({spec.dassl_name}) is not ready:"]
    lines += [f"  - {p}" for p in problems]
    lines += ["Expected layout:", *("  " + r for r in layout_tree(name, root).splitlines())]
    lines.append(
        f"To fix: download {spec.dassl_name} and put it at {where} as shown"
        + (f", with {spec.split} beside it" if spec.split else "")
        + " (see the README's data section). If your data lives elsewhere, pass the folder that"
        " contains it as the data root (--root on the command line, DATASET.ROOT in a config)."
    )
    return DatasetError("\n".join(lines))
