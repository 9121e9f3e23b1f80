"""The built-in worlds and what a data root is: real data, the toy world or synthetic fakes.

``python run.py`` without ``--root`` runs on a built-in world written on disk in the real
folder layouts: the toy world (generated scenes, classified by a small CLIP pre-trained
on such scenes, shipped in ``benchmark/weights/``) or synthetic fakes (coloured shapes,
a random tiny CLIP: a smoke test).  Each world has its own CLIP and its own prompt
template rule, which the harness hands to the methods (``dataset_template``).
"""

from __future__ import annotations

import fcntl
import json
import logging
from pathlib import Path
from typing import Callable

from datasets import synthetic, toy
from datasets.catalog import CATALOG

log = logging.getLogger(__name__)

WORLDS = ("toy", "synthetic")
WORLD_BACKBONES = {"toy": "toy-clip", "synthetic": "tiny-clip-12"}  # each world's own CLIP
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "benchmark" / "weights"
GENERIC_TEMPLATE = "a photo of a {}."


def toy_weights() -> Path:
    return WEIGHTS_DIR / f"{WORLD_BACKBONES['toy']}.pt"


def default_world() -> str:
    """The toy world when its CLIP is shipped, else the synthetic one."""
    return "toy" if toy_weights().is_file() else "synthetic"


def world_of(root: str | Path | None) -> str:
    """"toy", "synthetic" or "real": what the datasets under ``root`` are."""
    if toy.is_toy_root(root):
        return "toy"
    if root and (Path(root) / synthetic.MARKER).is_file():
        return "synthetic"
    return "real"


def dataset_template(name: str, world: str = "real") -> str:
    """The zero-shot prompt template of a dataset of the catalogue (the generic one
    otherwise); in the toy world every slot uses the toy CLIP's caption form."""
    if world == "toy":
        return toy.TEMPLATE
    spec = CATALOG.get(name)
    return spec.template if spec is not None else GENERIC_TEMPLATE


def prepare_world(world: str, output: str | Path, announce: Callable[[str], None] = log.info) -> Path:
    """The built-in world's datasets under ``output`` (written once; rewritten when their
    version changes), under a lock: two sweeps started together on a fresh folder write
    them once.  ``announce`` hears what is being written.  Returns the data root."""
    if world not in WORLDS:
        raise ValueError(f"Unknown world {world!r}; use one of {', '.join(WORLDS)}.")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / ".world.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if world == "toy":
            return _prepare_toy(output, announce)
        root = output / "synthetic_data"
        if not (root / synthetic.MARKER).is_file():
            announce(f"Writing synthetic datasets to {root} ...")
            synthetic.write_synthetic_root(root)
        return root


def _prepare_toy(output: Path, announce: Callable[[str], None]) -> Path:
    weights = toy_weights()
    if not weights.is_file():
        raise FileNotFoundError(
            f"The toy world needs its pre-trained CLIP at {weights}, which is not there (it ships with "
            f"the repository: restore it with `git checkout -- benchmark/weights`). To train it again, "
            f"run the `reproduce` command of benchmark/weights/toy-clip.json (about 5 minutes on one GPU), "
            f"or use --world synthetic.")
    root = output / "toy_data"
    marker = root / toy.MARKER
    if not marker.is_file() or json.loads(marker.read_text()).get("version") != toy.VERSION:
        announce(f"Writing the toy world's datasets to {root} ...")
        toy.write_toy_root(root)
    return root
