"""Dataset-level recognition accuracy layer by layer, reconstructed from the MMA paper.

"MMA: Multi-Modal Adapter for Vision-Language Models" (CVPR 2024), Figure 1, measures how
well CLIP's image and text features at each depth tell the datasets apart.  No official
code exists; the protocol below is our reconstruction, fixed for every backbone, tower,
layer and seed:

- items: per dataset, ``samples`` training images drawn by ``random.Random(f"{seed}:{dataset}")``
  (image tower), and the prompt "a photo of a {class}." of every class (text tower; one
  template for every dataset, so the prompt's wording never names the dataset);
- features: the pooled token at X_Embed, after every block and at X_Proj
  (``benchmark.analysis.layers``), in fp32, images through the test transform;
- split: per dataset, its items shuffled by ``random.Random(f"{seed}:{tower}:{dataset}")``,
  the first ceil(n/2) train the classifier and the rest measure it; one split per seed and
  tower, used at every layer;
- classifier: each feature L2-normalised, standardised with the training part's mean and
  std, multinomial logistic regression (L2 penalty, C=1, classes weighted by inverse
  frequency); accuracy: the mean over datasets of the share of held-out items whose
  dataset is recognised (balanced accuracy, in %; chance is 100 / datasets);
- gap: 1 - linear CKA ("Similarity of Neural Network Representations Revisited", ICML 2019)
  between the features of a seed's sampled images and the text features of their classes
  at the same point: 0 when the two towers' geometries agree up to rotation and scale.

Features are extracted once per backbone (all images any seed draws) and cached on disk
under ``<output>/cache/analysis/``; seeds only choose samples and splits.  A cache entry
holds the CRC-32 of every point's tensor (``benchmark.files.tensor_checksum``), checked
when it is read: an entry that fails it (or cannot be read, or holds another key or row
count) is logged and extracted again, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from benchmark.analysis.layers import (
    image_points,
    point_names,
    text_points,
    tower_depths,
)
from benchmark.files import tensor_checksum, write_torch_atomic
from datasets.base import DatasetError, Datum

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # part of the cache keys: what a feature depends on
ENTRY_FORMAT = 2  # of a cache entry's dict; 2: with a checksum per point
PROMPT = "a photo of a {}."
DEFAULT_SAMPLES = 80  # images per dataset and seed; the toy world's smallest training split holds 96
TOWERS = ("text", "image")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class Settings:
    root: Path
    backbones: list[str]
    datasets: list[str]
    seeds: list[int]
    samples: int = DEFAULT_SAMPLES
    output: Path = Path("results/runs")
    device: str = "auto"
    workers: int = 0  # image-loader worker processes
    batch_size: int = 64


@dataclass
class Result:
    frame: pd.DataFrame  # one row per backbone, tower, layer and seed
    paths: list[Path] = field(default_factory=list)
    extracted: list[tuple[str, str]] = field(default_factory=list)  # (backbone, tower) computed in this call
    cached: list[tuple[str, str]] = field(default_factory=list)  # (backbone, tower) read from the cache


# ----------------------------------------------------------------------------- items and splits

@dataclass
class _Data:
    names: list[str]
    train: dict[str, list[Datum]]
    classnames: dict[str, list[str]]


def load_data(names: Sequence[str], root: str | Path, samples: int) -> _Data:
    """Every dataset's training split and class names; too few training images or classes is
    an error naming the dataset and the fix."""
    from datasets.build import build_dataset
    from datasets.catalog import resolve_name

    keys = list(dict.fromkeys(resolve_name(name) for name in names))
    if len(keys) < 2:
        raise ValueError(f"Dataset-level recognition needs at least two datasets; got {keys}.")
    if samples < 2:
        raise ValueError(f"--samples-per-dataset must be at least 2 (one to train, one to test); got {samples}.")
    train, classnames = {}, {}
    for key in keys:
        splits = build_dataset(key, root)
        if len(splits.train) < samples:
            raise DatasetError(f"Dataset {key!r} under {root} has {len(splits.train)} training images, fewer than "
                               f"--samples-per-dataset {samples}. Choose --samples-per-dataset {len(splits.train)} "
                               f"or less, or leave {key} out of --datasets.")
        if len(splits.classnames) < 2:
            raise DatasetError(f"Dataset {key!r} has {len(splits.classnames)} class; the text tower's split needs "
                               "at least two classes per dataset. Leave it out of --datasets.")
        train[key], classnames[key] = list(splits.train), list(splits.classnames)
    return _Data(keys, train, classnames)


def sample_indices(n: int, samples: int, seed: int, dataset: str) -> list[int]:
    """The training images (indices, in list order) that ``seed`` draws from ``dataset``."""
    return sorted(random.Random(f"{seed}:{dataset}").sample(range(n), samples))


def split_halves(groups: Sequence[str], seed: int, tower: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of ``groups`` (the dataset of each item): per dataset, its
    items shuffled by the seed, the first ceil(n/2) to train, the others to test."""
    train, test = [], []
    for dataset in dict.fromkeys(groups):
        members = [i for i, g in enumerate(groups) if g == dataset]
        random.Random(f"{seed}:{tower}:{dataset}").shuffle(members)
        half = math.ceil(len(members) / 2)
        train += members[:half]
        test += members[half:]
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def prompt(classname: str) -> str:
    return PROMPT.format(classname.replace("_", " "))


# ----------------------------------------------------------------------------- measures

def dataset_accuracy(features: np.ndarray, groups: Sequence[str], train: np.ndarray, test: np.ndarray) -> float:
    """Balanced accuracy (%) of the dataset predicted from ``features`` by the protocol's
    linear classifier, trained on rows ``train`` and measured on rows ``test``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    x = features.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = np.asarray(groups)
    scaler = StandardScaler().fit(x[train])
    classifier = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a separable layer stops at max_iter; fine
        classifier.fit(scaler.transform(x[train]), y[train])
    return 100.0 * float(balanced_accuracy_score(y[test], classifier.predict(scaler.transform(x[test]))))


def tower_accuracies(points: Sequence[np.ndarray], groups: Sequence[str], seed: int, tower: str) -> list[float]:
    """``dataset_accuracy`` at every point of a tower, all with the one split of this seed and tower."""
    train, test = split_halves(groups, seed, tower)
    return [dataset_accuracy(features, groups, train, test) for features in points]


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between paired rows of ``x`` (n, d1) and ``y`` (n, d2), in float64."""
    x = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    y = y.astype(np.float64) - y.mean(0, dtype=np.float64)
    cross = np.linalg.norm(y.T @ x) ** 2
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denominator) if denominator > 0 else float("nan")


# ----------------------------------------------------------------------------- features (cached)

def _test_cfg(clip):
    """The test transform's settings as the methods' configs set them, at the backbone's size."""
    from benchmark.config import get_cfg_default
    from benchmark.models import input_size

    cfg = get_cfg_default()
    cfg.INPUT.SIZE = input_size(clip)
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD = list(CLIP_MEAN), list(CLIP_STD)
    cfg.INPUT.TRANSFORMS = ("normalize",)
    return cfg


def _key(header: dict, lines: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, **header}, sort_keys=True).encode())
    for line in lines:
        h.update(f"\n{line}".encode())
    return h.hexdigest()[:32]


def _cached(path: Path, key: str, compute: Callable[[], list[torch.Tensor]], rows: int) -> tuple[list[torch.Tensor], bool]:
    """The cache entry at ``path`` when it is whole (every point's checksum matches) and
    holds ``rows`` rows per point, else ``compute()`` stored there.  Returns (features per
    point, read from the cache)."""
    if path.is_file():
        points = _read_entry(path, key, rows)
        if points is not None:
            return points, True
    points = compute()
    write_torch_atomic(path, {"format": ENTRY_FORMAT, "key": key, "points": points,
                              "checksums": [tensor_checksum(p) for p in points]})
    return points, False


def _read_entry(path: Path, key: str, rows: int) -> list[torch.Tensor] | None:
    """The points of the entry at ``path``, or None (logged as damaged, but for an entry of
    another format)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("format") != ENTRY_FORMAT and isinstance(stored.get("points"), list):
            log.info("Analysis cache entry %s is of format %s, not %d; extracting again.", path,
                     stored.get("format", 1), ENTRY_FORMAT)
            return None
        points, checksums = list(stored["points"]), list(stored["checksums"])
        if stored.get("key") != key or any(p.shape[0] != rows for p in points):
            problem = f"it holds another key or not {rows} rows per point"
        elif len(checksums) != len(points) or any(tensor_checksum(p) != c for p, c in zip(points, checksums)):
            problem = "its features fail their checksums"
        else:
            return points
    except Exception as exc:  # a damaged entry is recomputed, never trusted
        problem = f"it cannot be read: {exc}"
    log.warning("Analysis cache entry %s is damaged (%s); extracting again.", path, problem)
    return None


def image_features(clip, backbone_id: str, items: Sequence[Datum], cache_dir: Path, device: torch.device, *,
                   workers: int = 0, batch_size: int = 64) -> tuple[list[torch.Tensor], bool]:
    """Every point's pooled image feature of ``items`` (test transform), one (n, width)
    CPU tensor per point, cached under ``cache_dir``."""
    from benchmark.loaders import image_loader

    cfg = _test_cfg(clip)
    cfg.DATALOADER.NUM_WORKERS = workers
    header = {"backbone": backbone_id, "tower": "image", "size": list(cfg.INPUT.SIZE),
              "interpolation": cfg.INPUT.INTERPOLATION, "mean": CLIP_MEAN, "std": CLIP_STD}
    lines = []
    for item in items:
        st = os.stat(item.impath)
        lines.append(f"{item.impath}\t{st.st_size}\t{st.st_mtime_ns}")
    key = _key(header, lines)

    def compute() -> list[torch.Tensor]:
        parts: list[list[torch.Tensor]] = []
        for images, _ in image_loader(items, cfg, device, augment=False, batch_size=batch_size, shuffle=False):
            parts.append([p.float().cpu() for p in image_points(clip, images.to(device))])
        return [torch.cat(column) for column in zip(*parts)]

    return _cached(Path(cache_dir) / f"image-{key}.pt", key, compute, len(items))


def text_features(clip, backbone_id: str, prompts: Sequence[str], cache_dir: Path, device: torch.device, *,
                  batch_size: int = 256) -> tuple[list[torch.Tensor], bool]:
    """Every point's end-of-text feature of ``prompts``, one (n, width) CPU tensor per point, cached."""
    from benchmark.backbone import tokenize

    context = int(clip.context_length)
    key = _key({"backbone": backbone_id, "tower": "text", "context_length": context}, prompts)

    def compute() -> list[torch.Tensor]:
        parts = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenize(list(prompts[start:start + batch_size]), context).to(device)
            parts.append([p.float().cpu() for p in text_points(clip, tokens)])
        return [torch.cat(column) for column in zip(*parts)]

    return _cached(Path(cache_dir) / f"text-{key}.pt", key, compute, len(prompts))


# ----------------------------------------------------------------------------- the analysis

def analyse_backbone(spec: str, data: _Data, settings: Settings, result: Result,
                     announce: Callable[[str], None] = log.info) -> list[dict]:
    """The rows of one backbone: accuracy per tower, point and seed; gap per point and seed."""
    from benchmark.backbone import backbone_fingerprint, load_clip, resolve_device

    device = resolve_device(settings.device)
    clip = load_clip(spec, device).eval()
    depths = tower_depths(clip)
    backbone_id = backbone_fingerprint(spec)
    cache_dir = Path(settings.output) / "cache" / "analysis"

    drawn = {(name, seed): sample_indices(len(data.train[name]), settings.samples, seed, name)
             for name in data.names for seed in settings.seeds}
    union = {name: sorted({i for seed in settings.seeds for i in drawn[name, seed]}) for name in data.names}
    items = [data.train[name][i] for name in data.names for i in union[name]]
    row_of = {(name, i): r for r, (name, i) in enumerate((n, i) for n in data.names for i in union[n])}
    text_items = [(name, c) for name in data.names for c in range(len(data.classnames[name]))]
    prompts = list(dict.fromkeys(prompt(data.classnames[n][c]) for n, c in text_items))
    prompt_row = {p: r for r, p in enumerate(prompts)}
    text_rows = np.array([prompt_row[prompt(data.classnames[n][c])] for n, c in text_items])
    text_groups = [n for n, _ in text_items]

    announce(f"{spec}: layer features of {len(items)} images and {len(prompts)} prompts ...")
    features = {}
    for tower in TOWERS:
        if tower == "image":
            points, hit = image_features(clip, backbone_id, items, cache_dir, device, workers=settings.workers,
                                         batch_size=settings.batch_size)
        else:
            points, hit = text_features(clip, backbone_id, prompts, cache_dir, device)
        (result.cached if hit else result.extracted).append((spec, tower))
        features[tower] = [p.numpy() for p in points]
    del clip

    names = {tower: point_names(depths[tower]) for tower in TOWERS}
    rows = []
    for seed in settings.seeds:
        image_rows = np.array([row_of[n, i] for n in data.names for i in drawn[n, seed]])
        image_groups = [n for n in data.names for _ in drawn[n, seed]]
        image_classes = np.array([prompt_row[prompt(data.classnames[n][data.train[n][i].label])]
                                  for n in data.names for i in drawn[n, seed]])
        gaps = {}
        for position, name in enumerate(names["image"]):
            if name in names["text"]:
                text_point = features["text"][names["text"].index(name)]
                gaps[name] = 1.0 - linear_cka(features["image"][position][image_rows], text_point[image_classes])
        for tower in TOWERS:
            selected, groups = (image_rows, image_groups) if tower == "image" else (text_rows, text_groups)
            accuracies = tower_accuracies([point[selected] for point in features[tower]], groups, seed, tower)
            for position, (name, accuracy) in enumerate(zip(names[tower], accuracies)):
                rows.append({"backbone": spec, "tower": tower, "layer": name, "position": position, "seed": seed,
                             "accuracy": accuracy, "gap": gaps.get(name, float("nan")),
                             "datasets": len(data.names)})
    return rows


def analysis_settings(args, announce: Callable[[str], None] = log.info) -> Settings:
    """Settings from the ``analyze`` command's arguments: the built-in world (written under
    ``--output`` when needed) and its CLIP unless ``--root`` / ``--clip`` say otherwise, as
    ``run`` does; bad backbones and devices fail here, before any extraction."""
    from benchmark.backbone import (
        DEFAULT_BACKBONE,
        backbone_fingerprint,
        resolve_device,
    )
    from benchmark.files import check_writable
    from datasets.catalog import BASE2NOVEL_DATASETS
    from datasets.worlds import WORLD_BACKBONES, prepare_world, world_of

    resolve_device(args.device)
    check_writable(args.output)
    if args.root is None:
        world = args.world
        root = prepare_world(world, Path(args.output), announce=announce)
    else:
        root = Path(args.root)
        world = world_of(root)
    backbones = list(args.clip or [WORLD_BACKBONES.get(world, DEFAULT_BACKBONE)])
    for spec in backbones:
        backbone_fingerprint(spec)  # an unknown name or a missing file: BackboneError with what to pass
    samples = DEFAULT_SAMPLES if args.samples_per_dataset is None else int(args.samples_per_dataset)
    return Settings(root=root, backbones=backbones, datasets=list(args.datasets or BASE2NOVEL_DATASETS),
                    seeds=list(args.seeds), samples=samples, output=Path(args.output), device=args.device,
                    workers=0 if world != "real" else 4)  # tiny images: workers cost more than they save


def run_dataset_level(settings: Settings, announce: Callable[[str], None] = log.info) -> Result:
    """The whole analysis: rows for every backbone, then the CSV, markdown table and figure
    under ``<output>/analysis/``."""
    from benchmark.analysis.report import write_outputs

    if not settings.seeds:
        raise ValueError("--seeds must name at least one seed, e.g. --seeds 1,2,3.")
    data = load_data(settings.datasets, settings.root, settings.samples)
    result = Result(frame=pd.DataFrame())
    rows = []
    for spec in dict.fromkeys(settings.backbones):
        rows += analyse_backbone(spec, data, settings, result, announce)
    result.frame = pd.DataFrame(rows)
    result.paths = write_outputs(result.frame, Path(settings.output) / "analysis")
    return result
