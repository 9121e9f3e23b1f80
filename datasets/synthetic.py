"""Small fake datasets written in the exact on-disk layout of the real ones.

Tests and demos read them through the same code path as real data: real JPEG files, real
split JSON files (or FGVC Aircraft's text files, or ImageNet's class folders and
``classnames.txt``), class names in each dataset's own style. Every class has its own
colour and shape, drawn with seeded noise, so a small model can learn them; a few images
are not square so that the resize and crop path is exercised. Flowers, Cars and FGVC
Aircraft list their images with labels interleaved, as the real files do, so the
"groups in order of first appearance" rule of the few-shot draw is exercised.

Defaults (8 train, 2 val, 4 test images per class, 6-10 classes, 32 px) give about 2,000
images and a few MB for all fifteen datasets.
"""

from __future__ import annotations

import colorsys
import json
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from datasets.catalog import CATALOG, list_datasets, resolve_name

SPLITS = ("train", "val", "test")
MARKER = "synthetic.json"  # marks a root of fakes: tables never compare it with published numbers
# (label, split, index, variant style, rng) -> image; variant styles: "", "sketch",
# "adversarial", "rendition" (ImageNet-V2, -Sketch, -A, -R)
Painter = Callable[[int, str, int, str, np.random.Generator], Image.Image]


@dataclass(frozen=True)
class _Class:
    name: str  # class name as the dataset spells it
    folder: str = ""  # class folder under the image root ("" for flat image folders)
    stem: str = ""  # file-name stem where the file name carries the class (pets)


@dataclass
class _Job:
    """What one writer needs: sizes, seed and a drawing function bound to the dataset."""

    key: str
    n_classes: int
    n: dict[str, int]
    image_size: int
    seed: int
    names: list[str] | None = None  # class names to use instead of the dataset-style fakes
    painter: Painter | None = None  # draws the images instead of the coloured shapes

    def draw(self, class_idx: int, split: str, j: int, style: str = "") -> Image.Image:
        rng = self._rng(class_idx, split, j)
        if self.painter is not None:
            return self.painter(class_idx, split, j, style, rng)
        return _draw(class_idx, self.image_size, rng, j, style)

    def classes(self, key: str | None = None) -> list[_Class]:
        key = key or self.key
        return _classes(key, self.n_classes) if self.names is None else _named_classes(key, self.names)

    def _rng(self, class_idx: int, split: str, j: int) -> np.random.Generator:
        salt = zlib.crc32(f"{self.key}/{split}".encode())
        return np.random.default_rng([self.seed, salt, class_idx, j])


# --------------------------------------------------------------------------- images


def _draw(class_idx: int, size: int, rng: np.random.Generator, j: int, style: str) -> Image.Image:
    """A class-coloured shape on a darker ground, jittered, with noise.

    Colour and shape both depend on the class; position, scale and noise on the image.
    Every third image is a little wider or taller than square.
    """
    w, h = size, size
    if j % 3 == 1:
        w += size // 4
    elif j % 3 == 2:
        h += size // 4
    hue = (class_idx * 0.381966) % 1.0  # golden-ratio steps keep neighbouring classes apart
    fg = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.95)) * 255
    bg = np.array(colorsys.hsv_to_rgb(hue, 0.6, 0.3)) * 255  # same hue: mean colour is a cue too
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h
    r = min(w, h) * rng.uniform(0.25, 0.38)
    dx, dy = xx - cx, yy - cy
    masks = [
        dx**2 + dy**2 <= r**2,  # disc
        (abs(dx) <= r) & (abs(dy) <= r),  # square
        (abs(dx) + abs(dy)) <= r * 1.3,  # diamond
        ((yy // max(2, size // 8)) % 2 == 0),  # horizontal stripes
        (abs(dx) <= r / 3) | (abs(dy) <= r / 3),  # cross
        ((xx + yy) // max(2, size // 8)) % 2 == 0,  # diagonal stripes
    ]
    mask = masks[class_idx % len(masks)][..., None]
    img = np.where(mask, fg, bg)
    noise = {"adversarial": 45.0}.get(style, 12.0)
    img = img + rng.normal(0.0, noise, img.shape)
    if style == "sketch":
        img = img.mean(axis=2, keepdims=True).repeat(3, axis=2)
    elif style == "rendition":
        img = (img // 64) * 64 + 32  # posterised, like a drawing
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _save(img: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, "JPEG", quality=85)


# --------------------------------------------------------------------------- class names


def _pick(pool: list, n: int, extra: Callable[[int], object]) -> list:
    return [pool[i] if i < len(pool) else extra(i) for i in range(n)]


def _camel_to_snake(action: str) -> str:
    # "ApplyEyeMakeup" -> "Apply_Eye_Makeup", as the official renaming does
    out = ""
    for i, ch in enumerate(action):
        out += ("_" if ch.isupper() and i > 0 else "") + ch
    return out


_CALTECH = ["Faces", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant",
            "barrel", "bass", "beaver", "binocular", "bonsai"]
_CALTECH_RENAME = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
                   "Motorbikes": "motorbike"}
_PETS = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
         "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair"]
_CARS = ["2012 AM General Hummer SUV", "2012 Acura TL Sedan", "2012 Audi TTS Coupe",
         "2007 BMW 6 Series Convertible", "2012 Chevrolet Corvette ZR1",
         "2009 Dodge Ram Pickup 3500 Quad Cab", "2012 Ferrari FF Coupe", "2012 Honda Odyssey Minivan",
         "2012 Jeep Wrangler SUV", "2012 Tesla Model S Sedan"]
_FLOWERS = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
            "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
            "globe thistle"]
_FOOD = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad",
         "beignets", "bibimbap", "bread_pudding", "breakfast_burrito"]
_AIRCRAFT = ["707-320", "727-200", "737-200", "A300B4", "ATR-42", "BAE 146-200", "Cessna 172",
             "DC-10", "Falcon 2000", "F-16A/B"]
_SUN = ["a/abbey", "a/apse/indoor", "b/bakery/shop", "b/bedroom", "c/canyon", "d/dining_room",
        "f/field/cultivated", "h/highway", "k/kitchen", "l/lighthouse"]
_DTD = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
        "crosshatched", "crystalline"]
_EUROSAT = [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"),
            ("HerbaceousVegetation", "Herbaceous Vegetation Land"), ("Highway", "Highway or Road"),
            ("Industrial", "Industrial Buildings"), ("Pasture", "Pasture Land"),
            ("PermanentCrop", "Permanent Crop Land"), ("Residential", "Residential Buildings"),
            ("River", "River"), ("SeaLake", "Sea or Lake")]
_UCF = ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching",
        "BaseballPitch", "Basketball", "BasketballDunk", "BenchPress"]
_IMAGENET = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
             ("n01491361", "tiger shark"), ("n01494475", "hammerhead shark"), ("n01496331", "electric ray"),
             ("n01498041", "stingray"), ("n01514668", "rooster"), ("n01514859", "hen"),
             ("n01518878", "ostrich")]


def _sun_class(path: str) -> _Class:
    # "a/apse/indoor" -> "indoor apse": the parts after the letter, reversed
    return _Class(name=" ".join(reversed(path.split("/")[1:])), folder=path)


def _classes(key: str, n: int) -> list[_Class]:
    """``n`` classes of dataset ``key`` in label order, real names first, then made-up ones."""
    if key == "caltech101":
        folders = _pick(_CALTECH, n, lambda i: f"object{i:03d}")
        return [_Class(_CALTECH_RENAME.get(f, f), folder=f) for f in folders]
    if key == "oxford_pets":
        return [_Class(s.lower(), stem=s) for s in _pick(_PETS, n, lambda i: f"breed{i:03d}")]
    if key == "stanford_cars":
        return [_Class(c) for c in _pick(_CARS, n, lambda i: f"2012 Model {i:03d} Sedan")]
    if key == "oxford_flowers":
        return [_Class(c) for c in _pick(_FLOWERS, n, lambda i: f"flower {i:03d}")]
    if key == "food101":
        return [_Class(c, folder=c) for c in _pick(_FOOD, n, lambda i: f"dish_{i:03d}")]
    if key == "fgvc_aircraft":
        return [_Class(c) for c in _pick(_AIRCRAFT, n, lambda i: f"Model {i:03d}")]
    if key == "sun397":
        return [_sun_class(p) for p in _pick(_SUN, n, lambda i: f"z/zone_{i:03d}")]
    if key == "dtd":
        return [_Class(c, folder=c) for c in _pick(_DTD, n, lambda i: f"texture{i:03d}")]
    if key == "eurosat":
        pairs = _pick(_EUROSAT, n, lambda i: (f"Land{i:03d}", f"Land Type {i:03d}"))
        return [_Class(name, folder=folder) for folder, name in pairs]
    if key == "ucf101":
        actions = _pick(_UCF, n, lambda i: f"Action{i:03d}")
        return [_Class(_camel_to_snake(a), folder=_camel_to_snake(a), stem=a) for a in actions]
    pairs = _pick(_IMAGENET, n, lambda i: (f"n{90000000 + i:08d}", f"synthetic object {i}"))
    return [_Class(name, folder=wnid) for wnid, name in pairs]


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace("_", " ").split())


def _named_classes(key: str, names: list[str]) -> list[_Class]:
    """Given class names (e.g. "red star") dressed in dataset ``key``'s naming style."""
    snake = [n.replace(" ", "_") for n in names]
    if key in ("caltech101", "dtd"):
        return [_Class(n, folder=f) for n, f in zip(names, snake)]
    if key in ("oxford_pets", "food101"):  # names with underscores, as these JSON files spell them
        return [_Class(f, folder=f, stem=f) for f in snake]
    if key == "sun397":
        return [_Class(n, folder=f"{f[0]}/{f}") for n, f in zip(names, snake)]
    if key == "eurosat":
        return [_Class(n, folder=_camel(n)) for n in names]
    if key == "ucf101":
        folders = ["_".join(p[:1].upper() + p[1:] for p in n.split()) for n in names]
        return [_Class(f, folder=f, stem=_camel(n)) for n, f in zip(names, folders)]
    if key in ("stanford_cars", "oxford_flowers", "fgvc_aircraft"):
        return [_Class(n) for n in names]
    return [_Class(n, folder=f"n{90000000 + i:08d}") for i, n in enumerate(names)]  # ImageNet family


DEFAULT_CLASSES: dict[str, int] = {
    "imagenet": 8, "caltech101": 8, "oxford_pets": 7, "stanford_cars": 6, "oxford_flowers": 8,
    "food101": 7, "fgvc_aircraft": 6, "sun397": 7, "dtd": 7, "eurosat": 10, "ucf101": 7,
    # the variants share the fake ImageNet's class list (A and R keep a subset of it)
    "imagenetv2": 8, "imagenet_sketch": 8, "imagenet_a": 8, "imagenet_r": 8,
}


def variant_subset(key: str, n: int) -> list[int]:
    """Indices of the fake ImageNet classes that a variant's image folder holds."""
    if key == "imagenet_a":
        return [i for i in range(n) if i % 3 != 2]
    if key == "imagenet_r":
        return [i for i in range(n) if i % 4 != 3]
    return list(range(n))


# --------------------------------------------------------------------------- JSON datasets


def _interleaved(rows: list[tuple[int, int, object]], n_classes: int) -> list[tuple[int, int, object]]:
    """Rows (label, j, payload) ordered image by image across classes, labels not ascending.

    Mirrors files listed by image number rather than by class; with a stride of 3 the
    first appearances come as 0, 3, 6, 1, ... instead of 0, 1, 2.
    """
    return sorted(rows, key=lambda r: (r[1], (r[0] * 3) % max(n_classes, 1), r[0]))


_INTERLEAVED = {"oxford_flowers", "stanford_cars", "fgvc_aircraft"}


class _Namer:
    """File names in each dataset's style; counters run across splits like real ids."""

    def __init__(self, key: str, seed: int):
        self.key = key
        self.count = 0
        self.per_class: dict[int, int] = {}
        self.rng = random.Random(f"{seed}/{key}")

    def __call__(self, label: int, c: _Class, split: str) -> str:
        self.count += 1
        k = self.per_class[label] = self.per_class.get(label, 0) + 1
        key = self.key
        if key == "caltech101":
            return f"{c.folder}/image_{k:04d}.jpg"
        if key == "oxford_pets":
            return f"{c.stem}_{k}.jpg"
        if key == "stanford_cars":
            return f"cars_{'test' if split == 'test' else 'train'}/{self.count:05d}.jpg"
        if key == "oxford_flowers":
            return f"image_{self.count:05d}.jpg"
        if key == "food101":
            return f"{c.folder}/{100000 + self.count * 7919 % 900000}.jpg"
        if key == "sun397":
            letters = "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(16))
            return f"{c.folder}/sun_{letters}.jpg"
        if key == "dtd":
            return f"{c.folder}/{c.folder}_{k:04d}.jpg"
        if key == "eurosat":
            return f"{c.folder}/{c.folder}_{k}.jpg"
        if key == "ucf101":
            return f"{c.folder}/v_{c.stem}_g{(k - 1) // 4 + 1:02d}_c{(k - 1) % 4 + 1:02d}.jpg"
        raise KeyError(key)


def _write_json_dataset(job: _Job, dataset_dir: Path) -> None:
    spec = CATALOG[job.key]
    image_root = dataset_dir / spec.images if spec.images else dataset_dir
    classes = job.classes()
    name = _Namer(job.key, job.seed)
    split_rows = {}
    for split in SPLITS:
        rows = []
        for label, c in enumerate(classes):
            for j in range(job.n[split]):
                rel = name(label, c, split)
                _save(job.draw(label, split, j), str(image_root / rel))
                rows.append((label, j, [rel, label, c.name]))
        if job.key in _INTERLEAVED:
            rows = _interleaved(rows, len(classes))
        split_rows[split] = [r[2] for r in rows]
    (dataset_dir / spec.split).write_text(json.dumps(split_rows, indent=4))
    _extras(job, dataset_dir, classes)


def _extras(job: _Job, dataset_dir: Path, classes: list[_Class]) -> None:
    """Files the real downloads carry beside the split file."""
    if job.key == "caltech101":
        # dropped by the official split; present on disk, absent from the JSON
        _save(job.draw(len(classes), "background", 0), str(dataset_dir / "101_ObjectCategories"
                                                             / "BACKGROUND_Google" / "image_0001.jpg"))
    if job.key == "oxford_flowers":
        names = {str(i + 1): c.name for i, c in enumerate(classes)}
        (dataset_dir / "cat_to_name.json").write_text(json.dumps(names, indent=4))


# --------------------------------------------------------------------------- other layouts


def _write_fgvc(job: _Job, dataset_dir: Path) -> None:
    classes = job.classes()
    (dataset_dir / "variants.txt").write_text("".join(c.name + "\n" for c in classes))
    image_id = 1000000
    for split in SPLITS:
        rows = []
        for label, c in enumerate(classes):
            for j in range(job.n[split]):
                image_id += 13
                _save(job.draw(label, split, j), str(dataset_dir / "images" / f"{image_id:07d}.jpg"))
                rows.append((label, j, f"{image_id:07d} {c.name}"))
        lines = [r[2] for r in _interleaved(rows, len(classes))]
        (dataset_dir / f"images_variant_{split}.txt").write_text("".join(x + "\n" for x in lines))


def _write_classnames(dataset_dir: Path, classes: list[_Class]) -> None:
    # every ImageNet-family folder carries the full ImageNet list, in sorted-wnid order
    (dataset_dir / "classnames.txt").write_text("".join(f"{c.folder} {c.name}\n" for c in classes))


def _write_imagenet(job: _Job, dataset_dir: Path) -> None:
    classes = job.classes("imagenet")
    _write_classnames(dataset_dir, classes)
    val_id = 0
    for label, c in enumerate(classes):
        for j in range(job.n["train"]):
            path = dataset_dir / "images" / "train" / c.folder / f"{c.folder}_{1000 + j * 17}.JPEG"
            _save(job.draw(label, "train", j), str(path))
        for j in range(job.n["test"]):  # the val folder is the test set
            val_id += 1
            path = dataset_dir / "images" / "val" / c.folder / f"ILSVRC2012_val_{val_id:08d}.JPEG"
            _save(job.draw(label, "test", j), str(path))


_VARIANT_FILES = {
    "imagenetv2": ("", "{:040x}.jpeg"),
    "imagenet_sketch": ("sketch", "sketch_{}.JPEG"),
    "imagenet_a": ("adversarial", "{:06d}.jpg"),
    "imagenet_r": ("rendition", "art_{}.jpg"),
}


def _write_variant(job: _Job, dataset_dir: Path) -> None:
    spec = CATALOG[job.key]
    classes = job.classes("imagenet")
    _write_classnames(dataset_dir, classes)
    image_dir = dataset_dir / spec.images
    style, pattern = _VARIANT_FILES[job.key]
    for idx in variant_subset(job.key, len(classes)):
        folder = str(idx) if job.key == "imagenetv2" else classes[idx].folder
        for j in range(job.n["test"]):
            number = zlib.crc32(f"{idx}/{j}".encode()) if job.key == "imagenetv2" else j
            # the class signal follows the ImageNet class, so ImageNet-trained models transfer
            _save(job.draw(idx, "test", j, style), str(image_dir / folder / pattern.format(number)))
    if job.key in ("imagenet_a", "imagenet_r"):
        (image_dir / "README.txt").write_text("Synthetic stand-in; one folder per wnid.\n")


# --------------------------------------------------------------------------- entry points


def write_synthetic_dataset(
    name: str,
    root: str | Path,
    *,
    n_classes: int | None = None,
    n_train: int = 8,
    n_val: int = 2,
    n_test: int = 4,
    image_size: int = 32,
    seed: int = 0,
    names: list[str] | None = None,
    painter: Painter | None = None,
) -> Path:
    """Write a fake ``name`` under ``root`` in its real layout; returns its dataset folder.

    ``n_train/n_val/n_test`` are images per class. ImageNet writes ``n_train`` per class
    to ``images/train`` and ``n_test`` to ``images/val`` (its test set); the variants write
    ``n_test`` per class. For the ImageNet family ``n_classes`` is the size of the fake
    ImageNet class list; ImageNet-A and -R keep a subset of it (``variant_subset``).
    The same arguments always give the same files. ``names`` replaces the made-up class
    names (``n_classes`` is then their number) and ``painter`` the image drawing; the toy
    world (``datasets.toy``) uses both.
    """
    key = resolve_name(name)
    dataset_dir = Path(root).expanduser() / CATALOG[key].folder
    dataset_dir.mkdir(parents=True, exist_ok=True)
    n = len(names) if names is not None else n_classes if n_classes is not None else DEFAULT_CLASSES[key]
    if n < 1:
        raise ValueError("n_classes must be at least 1")
    job = _Job(key, n, {"train": n_train, "val": n_val, "test": n_test}, image_size, seed,
               names=list(names) if names is not None else None, painter=painter)
    if key == "imagenet":
        _write_imagenet(job, dataset_dir)
    elif key == "fgvc_aircraft":
        _write_fgvc(job, dataset_dir)
    elif CATALOG[key].test_only:
        _write_variant(job, dataset_dir)
    else:
        _write_json_dataset(job, dataset_dir)
    return dataset_dir


def write_synthetic_root(root: str | Path, names: list[str] | None = None, **kw) -> Path:
    """Write several fake datasets (all fifteen by default) under ``root``; returns ``root``."""
    for name in names or list_datasets():
        write_synthetic_dataset(name, root, **kw)
    (Path(root) / MARKER).write_text(json.dumps({"world": "synthetic"}) + "\n")
    return Path(root)
