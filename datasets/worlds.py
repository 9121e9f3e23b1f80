"""The built-in worlds and what a data root is: real data, the toy world or synthetic fakes.

``python run.py`` without ``--root`` runs on a built-in world written on disk in the real
folder layouts: the toy world (generated scenes, classified by a small CLIP pre-trained
on such scenes, shipped in ``benchmark/weights/``) or synthetic fakes (coloured shapes,
a random tiny CLIP: a smoke test).  Each world has its own CLIP and its own prompt
template rule, which the harness hands to the methods (``dataset_template``).

A built-in world is written once per machine (``prepare_world``), under
``$CLIP_FEWSHOT_WORLDS`` or ``$XDG_CACHE_HOME/clip-fewshot-benchmark/worlds``
(``~/.cache/clip-fewshot-benchmark/worlds``), in a folder named by its version and a hash of
the code that writes it, and shared by every results folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import PIL

from datasets import catalog as catalog_module
from datasets import synthetic, toy
from datasets.catalog import CATALOG

log = logging.getLogger(__name__)

WORLDS = ("toy", "synthetic")
WORLD_BACKBONES = {"toy": "toy-clip", "synthetic": "tiny-clip-12"}  # each world's own CLIP
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "benchmark" / "weights"
GENERIC_TEMPLATE = "a photo of a {}."
WORLDS_ENV = "CLIP_FEWSHOT_WORLDS"  # where the built-in worlds' datasets are written (worlds_dir)


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


def worlds_dir(cache: str | Path | None = None) -> Path:
    """The folder that holds the built-in worlds' datasets, written once per machine:
    ``cache`` when given, else ``$CLIP_FEWSHOT_WORLDS``, else
    ``$XDG_CACHE_HOME/clip-fewshot-benchmark/worlds`` (``~/.cache/...`` without it)."""
    if cache:
        return Path(cache).expanduser()
    if os.environ.get(WORLDS_ENV):
        return Path(os.environ[WORLDS_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "clip-fewshot-benchmark" / "worlds"


def world_folder_name(world: str) -> str:
    """``<world>-v<version>-<fingerprint>``: the version the world's writer declares and a
    hash of the code that writes it (and of Pillow, which encodes the images), so that a
    world written by other code is never read as this one."""
    version = toy.VERSION if world == "toy" else getattr(synthetic, "VERSION", 1)
    modules = [synthetic, catalog_module] + ([toy, toyworld_module()] if world == "toy" else [])
    digest = hashlib.sha256(PIL.__version__.encode())
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return f"{world}-v{version}-{digest.hexdigest()[:10]}"


def toyworld_module():
    from datasets import toyworld  # the renderer: imported only where a toy world is written or named

    return toyworld


def prepare_world(world: str, output: str | Path, announce: Callable[[str], None] = log.info, *,
                  cache: str | Path | None = None) -> Path:
    """The built-in world's datasets, written once per machine under ``worlds_dir(cache)``
    (``<world>-v<version>-<fingerprint>``; a new version or writer gets a new folder) and
    shared by every results folder; returns the data root.  Two sweeps that start together
    write it once (a lock), and a world is written to a temporary folder and renamed into
    place, so that a write killed half-way is never read.  Where the cache folder cannot be
    written, the datasets go under ``output`` as before (``<output>/<world>_data``).
    ``announce`` hears what is being written and where."""
    if world not in WORLDS:
        raise ValueError(f"Unknown world {world!r}; use one of {', '.join(WORLDS)}.")
    if world == "toy":
        _check_toy_weights()
    folder = worlds_dir(cache)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f".{world}.lock", "w")
    except OSError as exc:
        output = Path(output)
        announce(f"The world cache {folder} cannot be written ({exc.strerror or exc}); the {world} world's "
                 f"datasets go under {output} (set {WORLDS_ENV} to a writable folder to share them).")
        output.mkdir(parents=True, exist_ok=True)
        with open(output / ".world.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            return _write_world(world, output / f"{world}_data", announce, in_place=True)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _write_world(world, folder / world_folder_name(world), announce)


def _written(world: str, root: Path) -> bool:
    marker = root / (toy.MARKER if world == "toy" else synthetic.MARKER)
    if not marker.is_file():
        return False
    if world != "toy":
        return True
    try:
        return json.loads(marker.read_text()).get("version") == toy.VERSION
    except (OSError, ValueError):
        return False


def _write_world(world: str, root: Path, announce: Callable[[str], None], in_place: bool = False) -> Path:
    """``root`` holding the world's datasets, written first when it does not (the caller
    holds the lock)."""
    if _written(world, root):
        return root
    what = "the toy world's datasets" if world == "toy" else "synthetic datasets"
    announce(f"Writing {what} to {root} ..." if in_place else
             f"Writing {what} to {root} (once for this machine; every results folder uses them) ...")
    write = toy.write_toy_root if world == "toy" else synthetic.write_synthetic_root
    if in_place:
        write(root)
        return root
    for stale in root.parent.glob(f".{root.name}.*.tmp"):  # writes killed half-way (the lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        shutil.rmtree(root, ignore_errors=True)  # an incomplete folder of an older harness
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_toy_weights() -> None:
    weights = toy_weights()
    if not weights.is_file():
        raise FileNotFoundError(
            f"The toy world needs its pre-trained CLIP at {weights}, which is not there (it ships with "
            f"the repository: restore it with `git checkout -- benchmark/weights`). To train it again, "
            f"run the `reproduce` command of benchmark/weights/toy-clip.json (about 5 minutes on one GPU), "
            f"or use --world synthetic.")
