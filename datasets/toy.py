"""The toy world's datasets: each of the 15 dataset slots plays a task of generated scenes.

The toy CLIP (``benchmark/weights/toy-clip.pt``) was pre-trained on captioned scenes of
``datasets.toyworld``.  Here those scenes become classification datasets written in the
real on-disk layouts (through ``datasets.synthetic``), so every loader, protocol and
table runs exactly as on real data.  Each slot pairs a task (its class names: compositions
of the attributes the toy CLIP knows) with a domain (how its images are drawn: drawing
styles, low contrast, blur, inverted colours), chosen so that zero-shot accuracy
is neither at the ceiling nor at the floor and the class counts spread as the real
datasets' do (many classes for ImageNet, SUN397 and Cars, few for EuroSAT):

    slot            classes  task (class names)                          domain
    imagenet        50       "<colour> <shape>", seen compositions        washed-out photos
    caltech101      24       "<pattern> <shape>"                         photos, hues rotated
    oxford_pets     12       "<size> <shape>"                            strongly washed-out photos
    stanford_cars   40       "<shape> on a <background> background"      strongly washed-out photos
    oxford_flowers  24       "<colour> <pattern> object"                 blurred photos
    food101         24       "<colour> <shape>", other seen compositions  washed-out paintings
    fgvc_aircraft   24       "<colour> <pattern> star"                   washed-out paintings
    sun397          40       "<colour> object on a <background> background"  washed-out photos
    dtd             16       "<pattern> <colour> object"                 blurred photos
    eurosat         10       "<shape> on a <background> background"      colour-inverted photos
    ucf101          18       "<colour> <shape>", HELD-OUT compositions    washed-out paintings, pixel art
    imagenetv2, imagenet_sketch, imagenet_a, imagenet_r: ImageNet's classes in new domains

Every slot's images share one domain, as real base and novel classes share their
dataset's: what a method learns about the domain can carry over to novel classes, what it
learns about the base names cannot.  Grid slots list their classes as a checkerboard over
the attribute grid (even index sums first), so that on the full grids (caltech101,
oxford_pets, stanford_cars, sun397, dtd) the base half (the first half of the labels) and
the novel half use the same attribute values; the composition slots keep their pairs'
order.

A root written here carries ``toyworld.json``; tables made from it never show the
published numbers (they are about real data).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from datasets.synthetic import variant_subset, write_synthetic_dataset

MARKER = "toyworld.json"
VERSION = 3  # bump when the written datasets change
TEMPLATE = "a photo of a {}."  # the toy CLIP's captions start this way


@dataclass(frozen=True)
class Task:
    """Classes of one slot: names and, per class, the attributes that every image shares."""

    names: list[str]
    fixed: list[dict]  # per class: Scene fields held fixed; the others vary per image
    description: str


@dataclass(frozen=True)
class Domain:
    """How a slot's images are drawn: a drawing style per image, then pixel operations."""

    styles: dict[str, float] = field(default_factory=lambda: {"photo": 1.0})  # style -> share
    noise: float = 0.0  # std of Gaussian pixel noise (0..255 scale), added last
    hue: float = 0.0  # hue rotation, degrees
    contrast: float = 1.0  # contrast factor (< 1: washed out)
    blur: float = 0.0  # Gaussian blur radius, pixels
    description: str = ""

    def style(self, rng: np.random.Generator) -> str:
        names = list(self.styles)
        if len(names) == 1:
            return names[0]
        cumulative = np.cumsum([self.styles[s] for s in names])
        return names[int(np.searchsorted(cumulative / cumulative[-1], rng.random(), side="right"))]

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        if self.hue:
            hsv = np.asarray(image.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(self.hue / 360 * 256))) % 256
            image = Image.fromarray(hsv, "HSV").convert("RGB")
        if self.contrast != 1.0:
            image = ImageEnhance.Contrast(image).enhance(self.contrast)
        if self.blur:
            image = image.filter(ImageFilter.GaussianBlur(self.blur))
        if self.noise:
            pixels = np.asarray(image, np.float32) + rng.normal(0, self.noise, (image.size[1], image.size[0], 3))
            image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
        return image


# --------------------------------------------------------------------------- tasks


def _spread(items: Sequence, n: int) -> list:
    """n items spread evenly over the sequence (deterministic)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _checkerboard(combos: list[tuple], vocabularies: Sequence[Sequence[str]]) -> list[tuple]:
    """Combinations ordered so that the first half and the second half of the labels (base
    and novel) both cover the attribute values: even index sums first, then odd ones."""
    def parity(combo: tuple) -> int:
        return sum(list(v).index(x) for v, x in zip(vocabularies, combo)) % 2

    return [c for c in combos if parity(c) == 0] + [c for c in combos if parity(c) == 1]


def _grid(fields: Sequence[str], vocabularies: Sequence[Sequence[str]], label: str, n: int | None,
          description: str, combos: list[tuple] | None = None) -> Task:
    combos = list(itertools.product(*vocabularies)) if combos is None else combos
    combos = _checkerboard(_spread(combos, n or len(combos)), vocabularies)
    return Task([label.format(*c) for c in combos], [dict(zip(fields, c)) for c in combos], description)


def _pairs(seen: bool) -> list[tuple[str, str]]:
    from datasets import toyworld as W  # the renderer is needed only to write datasets

    pairs = [(s, c) for s in W.SHAPES for c in W.COLOURS]
    return [p for p in pairs if (p in W.HELD_OUT) != seen]


def build_tasks() -> dict[str, Task]:
    from datasets import toyworld as W

    shapes, colours, patterns = list(W.SHAPES), list(W.COLOURS), list(W.PATTERNS)
    sizes, backgrounds = list(W.SIZES), list(W.BACKGROUNDS)
    seen = _pairs(seen=True)
    imagenet_pairs = _spread(seen, 50)
    food_pairs = _spread([p for p in seen if p not in imagenet_pairs], 24)

    def compositions(pairs, description):
        return _grid(("shape", "colour"), (shapes, colours), "{1} {0}", None, description, combos=pairs)

    # EuroSAT keeps the first version's ten classes (ten shapes on six backgrounds, in order)
    eurosat = [(s, b) for s, b in zip(shapes, backgrounds * 2)]
    return {
        "imagenet": compositions(imagenet_pairs, "colour and shape compositions"),
        "caltech101": _grid(("pattern", "shape"), (patterns, shapes), "{} {}", 24, "pattern and shape"),
        "oxford_pets": _grid(("size", "shape"), (sizes, shapes[:6]), "{} {}", None, "size and shape"),
        "stanford_cars": _grid(("shape", "background"), (shapes, backgrounds), "{} on a {} background", 40,
                               "shape on a background"),
        "oxford_flowers": _grid(("colour", "pattern"), (colours, patterns), "{} {} object", 24,
                                "colour and pattern"),
        "food101": compositions(food_pairs, "other colour and shape compositions"),
        "fgvc_aircraft": Task(*_star_task(colours, patterns)),
        "sun397": _grid(("colour", "background"), (colours, backgrounds), "{} object on a {} background", 40,
                        "colour on a background"),
        "dtd": _grid(("pattern", "colour"), (patterns, colours[:4]), "{} {} object", None, "pattern and colour"),
        "eurosat": Task([f"{s} on a {b} background" for s, b in eurosat], [dict(shape=s, background=b)
                                                                            for s, b in eurosat],
                        "shape on a background"),
        "ucf101": compositions(_pairs(seen=False), "held-out colour and shape compositions"),
    }


def _star_task(colours: list[str], patterns: list[str]) -> tuple[list[str], list[dict], str]:
    grid = _grid(("colour", "pattern"), (colours, patterns), "{} {} star", 24, "colour and pattern of one shape")
    return grid.names, [dict(f, shape="star") for f in grid.fixed], grid.description


# --------------------------------------------------------------------------- domains

# how each slot's images are drawn (train, val and test alike).  Real datasets are off
# CLIP's pre-training distribution to different degrees, and in systematic ways (satellite
# views, textures, renditions) that a few labelled images can teach; here each slot is
# drawn in a systematic domain that the toy CLIP saw rarely (paintings) or never
# (washed-out, blurred or hue-rotated images, inverted colours, pixel art), that keeps the
# attributes its class names are made of, and that puts its zero-shot base accuracy
# between about 30% and 80%.  Random pixel noise, which no adaptation can learn, is used
# only for the ImageNet variants' shifts.
DOMAINS: dict[str, Domain] = {
    "imagenet": Domain(contrast=0.35, description="washed-out photos"),
    "caltech101": Domain(hue=90, description="photos, hues rotated by 90 degrees"),
    "oxford_pets": Domain(contrast=0.2, description="strongly washed-out photos"),
    "stanford_cars": Domain(contrast=0.2, description="strongly washed-out photos"),
    "oxford_flowers": Domain(blur=2.2, description="blurred photos"),
    "food101": Domain({"painting": 1.0}, contrast=0.4, description="washed-out paintings"),
    "fgvc_aircraft": Domain({"painting": 1.0}, contrast=0.4, description="washed-out paintings"),
    "sun397": Domain(contrast=0.35, description="washed-out photos"),
    "dtd": Domain(blur=2.2, description="blurred photos"),
    "eurosat": Domain({"inverted": 1.0}, description="colour-inverted photos"),
    "ucf101": Domain({"painting": 0.5, "pixelated": 0.5}, contrast=0.35,
                     description="washed-out paintings and pixel art"),
}

# the ImageNet variants' test images: ImageNet's classes in other domains
VARIANT_DOMAINS: dict[str, Domain] = {
    "imagenetv2": Domain(contrast=0.35, noise=10, description="fresh washed-out photos, slightly noisy"),
    "imagenet_sketch": Domain({"sketch": 1.0}, description="sketches"),
    "imagenet_a": Domain(contrast=0.3, noise=20, description="washed-out, noisy photos"),
    "imagenet_r": Domain({"painting": 0.5, "pixelated": 0.5}, contrast=0.35,
                         description="washed-out paintings and pixel art"),
}


def slot_domain(slot: str) -> Domain:
    return VARIANT_DOMAINS.get(slot) or DOMAINS.get(slot) or DOMAINS["imagenet"]


def _painter(task: Task, image_size: int, slot: str) -> Callable:
    from datasets import toyworld as W

    domain = slot_domain(slot)

    def paint(label: int, split: str, j: int, variant: str, rng: np.random.Generator) -> Image.Image:
        base = W.sample_scene(rng, held_out_ok=True)
        fixed = task.fixed[label] if label < len(task.fixed) else {}
        scene = replace(base, **fixed, style=domain.style(rng))
        return domain.apply(W.render(scene, image_size, rng), rng)

    return paint


SIZES = {"train": 18, "val": 4, "test": 10}  # images per class; 18 >= 16 shots
VARIANT_TEST = 6


def write_toy_root(root: str | Path, names: list[str] | None = None, *, image_size: int | None = None,
                   seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Write the toy datasets (all 15 slots by default) under ``root``; returns ``root``."""
    from datasets.catalog import CATALOG, list_datasets

    root = Path(root)
    image_size = image_size or toy_image_size()
    tasks = build_tasks()
    sizes = {**SIZES, **(sizes or {})}
    chosen = names or list_datasets()
    for slot in chosen:
        variant = CATALOG[slot].test_only
        task = tasks["imagenet"] if variant else tasks[slot]
        write_synthetic_dataset(slot, root, names=task.names, seed=seed, image_size=image_size,
                                n_train=sizes["train"], n_val=sizes["val"],
                                n_test=VARIANT_TEST if variant else sizes["test"],
                                painter=_painter(task, image_size, slot))
    marker = {"world": "toy", "version": VERSION, "seed": seed, "image_size": image_size,
              "template": TEMPLATE, "train_per_class": sizes["train"], "datasets": {
                  slot: {"task": (tasks["imagenet"] if CATALOG[slot].test_only else tasks[slot]).description,
                         "domain": slot_domain(slot).description,
                         "classes": len(variant_subset(slot, len(tasks["imagenet"].names)))
                         if CATALOG[slot].test_only else len(tasks[slot].names)}
                  for slot in chosen}}
    (root / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return root


def train_size(root: str | Path, dataset: str, shots: int, subsample: str = "all") -> int:
    """Training images of a run on the toy world under ``root``: ``shots`` per class (at
    most the images a class has) of the classes kept by ``subsample`` (base: the first
    half, rounded up; new: the rest).  0 when ``root`` holds no such toy dataset."""
    try:
        marker = json.loads((Path(root) / MARKER).read_text())
        n = int(marker["datasets"][dataset]["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    per_class = min(int(shots), int(marker.get("train_per_class", SIZES["train"])))
    half = -(-n // 2)
    kept = {"base": half, "new": n - half}.get(subsample, n)
    return per_class * kept


def toy_image_size() -> int:
    """The toy CLIP's input size (its config), which the datasets are drawn at."""
    config = Path(__file__).resolve().parent.parent / "benchmark" / "model_configs" / "toy-clip.json"
    return int(json.loads(config.read_text())["vision_cfg"]["image_size"])


def is_toy_root(root: str | Path | None) -> bool:
    return bool(root) and (Path(root) / MARKER).is_file()
