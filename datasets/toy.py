"""The toy world's datasets: each of the 15 dataset slots plays a task of generated scenes.

The toy CLIP (``benchmark/weights/toy-clip.pt``) was pre-trained on captioned scenes of
``datasets.toyworld``.  Here those scenes become classification datasets written in the
real on-disk layouts (through ``datasets.synthetic``), so every loader, protocol and
table runs exactly as on real data:

    slot            task (class names)                         drawn as              role
    imagenet        "<colour> <shape>", seen compositions     photos                large source for cross-dataset
    caltech101      shapes                                    photos                generic objects
    oxford_pets     "<pattern> <shape>"                       photos                fine-grained
    stanford_cars   "<size> <shape>"                          paintings             fine-grained
    oxford_flowers  colours ("red object")                    noisy photos          colour-driven
    food101         "<colour> <shape>", other seen pairs      paintings             compositions
    fgvc_aircraft   "<colour> <pattern> star"                 noisy photos          very fine-grained
    sun397          backgrounds ("object on a grass background")  60% photos, 40% inverted  scenes
    dtd             patterns ("striped object")               paintings             textures
    eurosat         "<shape> on a <background> background"    inverted colours      off-distribution layout
    ucf101          "<colour> <shape>", HELD-OUT pairs         pixel art             compositions never seen in pre-training
    imagenetv2      ImageNet's classes, fresh photos          photos                in-domain re-test
    imagenet_sketch ImageNet's classes as sketches            sketches              domain shift
    imagenet_a      a subset, noisy photos                    noisy photos          hard domain shift
    imagenet_r      a subset, paintings / pixelated           paintings, pixel art  rendition shift

The styles (``DOMAINS``) put each slot off the pre-training distribution to a different
degree, as real datasets are for CLIP, so zero-shot accuracy spreads and adaptation has
something to do.

A root written here carries ``toyworld.json``; tables made from it never show the
published numbers (they are about real data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from datasets.synthetic import variant_subset, write_synthetic_dataset

MARKER = "toyworld.json"
VERSION = 2  # bump when the written datasets change
TEMPLATE = "a photo of a {}."  # the toy CLIP's captions start this way


@dataclass(frozen=True)
class Task:
    """Classes of one slot: names and, per class, the attributes that every image shares."""

    names: list[str]
    fixed: list[dict]  # per class: Scene fields held fixed; the others vary per image
    description: str


def _pairs(seen: bool) -> list[tuple[str, str]]:
    from datasets import toyworld as W  # the renderer is needed only to write datasets

    pairs = [(s, c) for s in W.SHAPES for c in W.COLOURS]
    return [p for p in pairs if (p in W.HELD_OUT) != seen]


def _spread(items: list, n: int) -> list:
    """n items spread evenly over the list (deterministic)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def build_tasks() -> dict[str, Task]:
    from datasets import toyworld as W

    seen = _pairs(seen=True)
    imagenet_pairs = _spread(seen, 30)
    food_pairs = _spread([p for p in seen if p not in imagenet_pairs], 12)
    novel_pairs = _spread(_pairs(seen=False), 12)
    colours, shapes = list(W.COLOURS), list(W.SHAPES)
    patterns = [p for p in W.PATTERNS]
    backgrounds = list(W.BACKGROUNDS)

    def comp(pairs):
        return Task([f"{c} {s}" for s, c in pairs], [dict(shape=s, colour=c) for s, c in pairs],
                    "colour and shape compositions")

    tasks = {
        "imagenet": comp(imagenet_pairs),
        "caltech101": Task(shapes, [dict(shape=s) for s in shapes], "shapes"),
        "oxford_pets": Task([f"{p} {s}" for s in shapes[:4] for p in patterns],
                            [dict(shape=s, pattern=p) for s in shapes[:4] for p in patterns],
                            "pattern and shape"),
        "stanford_cars": Task([f"{z} {s}" for s in shapes for z in W.SIZES],
                              [dict(shape=s, size=z) for s in shapes for z in W.SIZES], "size and shape"),
        "oxford_flowers": Task([f"{c} object" for c in colours], [dict(colour=c) for c in colours], "colours"),
        "food101": comp(food_pairs),
        "fgvc_aircraft": Task([f"{c} {p} star" for c in colours[:4] for p in patterns],
                              [dict(shape="star", colour=c, pattern=p) for c in colours[:4] for p in patterns],
                              "colour and pattern of one shape"),
        "sun397": Task([f"object on a {b} background" for b in backgrounds], [dict(background=b) for b in backgrounds],
                       "backgrounds"),
        "dtd": Task([f"{p} object" for p in patterns], [dict(pattern=p) for p in patterns], "patterns"),
        "eurosat": Task([f"{s} on a {b} background" for s, b in zip(shapes, backgrounds * 3)][:10],
                        [dict(shape=s, background=b) for s, b in zip(shapes, backgrounds * 3)][:10],
                        "shape on background"),
        "ucf101": comp(novel_pairs),
    }
    tasks["ucf101"] = replace(tasks["ucf101"], description="held-out colour and shape compositions")
    return tasks


# variant slots: (style of the images, rendered from ImageNet's classes)
VARIANT_STYLES = {"imagenetv2": "photo", "imagenet_sketch": "sketch", "imagenet_a": "noisy",
                  "imagenet_r": "painting"}

# drawing styles of the other slots' images (train, val and test alike), as shares. Real
# datasets are off the pre-training distribution to different degrees (satellite images,
# textures, aircraft), which is why zero-shot accuracy varies and few-shot adaptation
# helps; here each slot is drawn in styles that the toy CLIP saw rarely ("painting") or
# never ("noisy", "inverted", "pixelated"), chosen so that its zero-shot accuracy spreads
# over roughly the range CLIP ViT-B/16 has on the real datasets
DOMAINS: dict[str, dict[str, float]] = {
    "imagenet": {"photo": 1.0},
    "caltech101": {"photo": 1.0},
    "oxford_pets": {"photo": 1.0},
    "stanford_cars": {"painting": 1.0},
    "oxford_flowers": {"noisy": 1.0},
    "food101": {"painting": 1.0},
    "fgvc_aircraft": {"noisy": 1.0},
    "sun397": {"photo": 0.6, "inverted": 0.4},
    "dtd": {"painting": 1.0},
    "eurosat": {"inverted": 1.0},
    "ucf101": {"pixelated": 1.0},
}


def _domain_style(slot: str, rng: np.random.Generator) -> str:
    shares = DOMAINS[slot]
    if len(shares) == 1:
        return next(iter(shares))
    styles = list(shares)
    cumulative = np.cumsum([shares[s] for s in styles])
    return styles[int(np.searchsorted(cumulative / cumulative[-1], rng.random(), side="right"))]


def _painter(task: Task, image_size: int, slot: str) -> Callable:
    from datasets import toyworld as W

    def paint(label: int, split: str, j: int, variant: str, rng: np.random.Generator) -> Image.Image:
        base = W.sample_scene(rng, held_out_ok=True)
        fixed = task.fixed[label] if label < len(task.fixed) else {}
        scene = replace(base, **fixed)
        if split == "test" and slot in VARIANT_STYLES:
            style = VARIANT_STYLES[slot]
            if style == "painting" and j % 2:
                style = "pixelated"  # renditions: half paintings, half pixel art
            scene = replace(scene, style=style)
        else:
            scene = replace(scene, style=_domain_style(slot if slot in DOMAINS else "imagenet", rng))
        return W.render(scene, image_size, rng)

    return paint


SIZES = {"train": 24, "val": 4, "test": 20}  # images per class; 24 >= 16 shots
VARIANT_TEST = 10


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
              "template": TEMPLATE, "datasets": {
                  slot: {"task": (tasks["imagenet"] if CATALOG[slot].test_only else tasks[slot]).description,
                         "classes": len(variant_subset(slot, len(tasks["imagenet"].names)))
                         if CATALOG[slot].test_only else len(tasks[slot].names)}
                  for slot in chosen}}
    (root / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return root


def toy_image_size() -> int:
    """The toy CLIP's input size (its config), which the datasets are drawn at."""
    config = Path(__file__).resolve().parent.parent / "benchmark" / "model_configs" / "toy-clip.json"
    return int(json.loads(config.read_text())["vision_cfg"]["image_size"])


def is_toy_root(root: str | Path | None) -> bool:
    return bool(root) and (Path(root) / MARKER).is_file()
