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

Content: the last file written into a world is ``world-manifest.json``, a CRC-32
(``benchmark.files.checksum``) of every file the writer wrote (``{"format": 1, "world",
"algorithm": "crc32", "files": {relative path: 8 hex digits}}``).  ``prepare_world``
checks every listed file against it, once per sweep (the whole toy world, 9,880 files
and 11 MB, in about 0.15 s from the page cache, 1 s from disk).  Files added later
(few-shot draws, ImageNet's file lists, which carry their own checksums) are not listed
and not checked.  A world with a file that fails (changed, missing, unreadable) is
warned about, naming the files, and written again; so is a world written before
manifests existed.  The new world is written to a temporary folder; the old folder is
then renamed aside (``.<folder>.replaced-<ns>.old``) and the new one renamed into its
place, so that a sweep reading the old world by path reads the new one from then on and
files it holds open stay readable; folders set aside are removed by a later call once an
hour old.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import PIL

from benchmark.files import CHECKSUM, checksum, write_json_atomic
from datasets import catalog as catalog_module
from datasets import synthetic, toy
from datasets.catalog import CATALOG

log = logging.getLogger(__name__)

WORLDS = ("toy", "synthetic")
WORLD_BACKBONES = {"toy": "toy-clip", "synthetic": "tiny-clip-12"}  # each world's own CLIP
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "benchmark" / "weights"
GENERIC_TEMPLATE = "a photo of a {}."
WORLDS_ENV = "CLIP_FEWSHOT_WORLDS"  # where the built-in worlds' datasets are written (worlds_dir)
MANIFEST = "world-manifest.json"  # a CRC-32 of every file of a world, written last
MANIFEST_FORMAT = 1
REPLACED_SECONDS = 3600  # a world folder set aside this long ago is removed by the next call


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
    place, so that a write killed half-way is never read.  A world already written is
    checked against its manifest of checksums first; one that fails it, or has none, is
    written again (see the module docstring).  Where the cache folder cannot be written,
    the datasets go under ``output`` as before (``<output>/<world>_data``).
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


def _files(root: Path) -> list[str]:
    """Every file under ``root`` but the manifest, as sorted relative POSIX paths."""
    found = []
    for folder, _, names in os.walk(root):
        rel = Path(folder).relative_to(root)
        found.extend((rel / name).as_posix() for name in names)
    return sorted(f for f in found if f != MANIFEST)


def write_manifest(world: str, root: str | Path) -> Path:
    """Write ``root``'s manifest: the CRC-32 of every file under it (read back from disk)."""
    root = Path(root)
    files = {rel: checksum((root / rel).read_bytes()) for rel in _files(root)}
    return write_json_atomic(root / MANIFEST, {"format": MANIFEST_FORMAT, "world": world,
                                               "algorithm": CHECKSUM, "files": files})


def damaged_files(root: str | Path) -> list[str] | None:
    """The files listed in ``root``'s manifest that are missing, unreadable or fail their
    CRC-32 (relative paths; the manifest itself when it cannot be read), [] when every
    one passes; None when ``root`` has no manifest (a world written before manifests)."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest["format"] != MANIFEST_FORMAT or manifest["algorithm"] != CHECKSUM or not isinstance(files, dict):
            raise ValueError("another format")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        return [MANIFEST]
    damaged = []
    for rel, want in files.items():
        try:
            if checksum((root / rel).read_bytes()) != want:
                damaged.append(rel)
        except (OSError, TypeError):
            damaged.append(rel)
    return damaged


def _listed(files: list[str], at_most: int = 5) -> str:
    text = ", ".join(files[:at_most])
    return text + (f" and {len(files) - at_most} more" if len(files) > at_most else "")


def _remove_replaced(root: Path) -> None:
    """Folders of ``root``'s name set aside at least ``REPLACED_SECONDS`` ago (the lock is ours)."""
    for old in root.parent.glob(f".{root.name}.replaced-*.old"):
        try:
            stamp = int(old.name[len(root.name) + len(".replaced-") + 1:-len(".old")])
        except ValueError:
            continue
        if time.time_ns() - stamp >= REPLACED_SECONDS * 1e9:
            shutil.rmtree(old, ignore_errors=True)


def _write_world(world: str, root: Path, announce: Callable[[str], None], in_place: bool = False) -> Path:
    """``root`` holding the world's datasets, written first when it does not, or when a
    file of it fails the manifest or it has none (the caller holds the lock)."""
    what = "the toy world's datasets" if world == "toy" else "synthetic datasets"
    saying = (f"Writing {what} to {root} ..." if in_place else
              f"Writing {what} to {root} (once for this machine; every results folder uses them) ...")
    _remove_replaced(root)
    written = _written(world, root)
    if written or os.path.lexists(root / MANIFEST):  # (a toy marker that fails to parse is damage too)
        started = time.perf_counter()
        damaged = damaged_files(root)
        log.info("Checked the %s world at %s against its manifest in %.2f s.", world, root,
                 time.perf_counter() - started)
        if damaged == [] and written:
            return root
        if damaged is None:
            saying = (f"Writing {what} to {root} again, once: it was written before worlds carried a manifest "
                      f"of checksums ...")
        else:
            log.warning("The %s world at %s is damaged: %d file(s) fail the checksums of its manifest: %s. "
                        "Writing it again; the damaged folder is set aside.", world, root, len(damaged),
                        _listed(damaged))
            saying = f"Writing {what} to {root} again: files of it failed their checksums ..."
    announce(saying)
    write = toy.write_toy_root if world == "toy" else synthetic.write_synthetic_root
    for stale in root.parent.glob(f".{root.name}.*.tmp"):  # writes killed half-way (the lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        write_manifest(world, tmp)  # last: a folder without it is not a complete world
        if os.path.lexists(root):  # damaged, older or incomplete: set aside, never deleted under a reader
            os.rename(root, root.with_name(f".{root.name}.replaced-{time.time_ns()}.old"))
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
