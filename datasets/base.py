"""Records, split reading, few-shot sampling, base/new class subsampling and the
official cache pickles (``datasets.build`` puts them together into a run's splits).

Reproduces the data side of the official code (its dataset base class and the
per-dataset constructors) without importing it:

- split JSON files are read as ``[relative path, label, class name]`` lists, order kept;
- the few-shot draw visits labels in order of first appearance and takes
  ``random.sample(items, K)`` per label, train first and then val with ``min(K, 4)``, on
  one ``random`` stream seeded with the run's seed, so the same images are picked;
- the draw is cached in ``<dataset_dir>/split_fewshot/shot_{K}-seed_{S}.pkl`` in the
  official pickle format, and an existing cache is used as it is;
- base/new subsampling splits the sorted train labels at ``ceil(n / 2)`` and relabels.

Official pickles hold ``dassl.data.datasets.base_dataset.Datum`` objects with absolute
paths of the machine that wrote them. They are read through a restricted unpickler that
admits only that class and plain containers, and their paths are moved onto the current
dataset root. Our own pickles are written so that the official code can read them.

Each pickle the harness writes gets a checksum file beside it, ``<file>.crc32.json``:
``{"algorithm": "crc32", "checksum": "<8 hex digits>", "size": <bytes>}`` of the pickle's
bytes (``benchmark.files.checksum``), written just before the pickle.  The pickle itself
is unchanged, so the official code reads it as before.  Reading a pickle that has a
checksum file checks it first and raises ``DamagedCacheError`` when the bytes fail it (a
flipped byte can still unpickle into another label or path); the callers warn, compute
the content again and rewrite both files.  A pickle without one (written by the official
code, or by an older harness) is read as it is.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import random
import re
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from benchmark.files import CHECKSUM, checksum, write_bytes_atomic, write_json_atomic

Splits = tuple[list["Datum"], list["Datum"], list["Datum"]]  # train, val, test

log = logging.getLogger(__name__)

SUBSAMPLE_CHOICES = ("all", "base", "new")
DASSL_DATUM_MODULE = "dassl.data.datasets.base_dataset"
DASSL_DATUM_NAME = "Datum"
CHECKSUM_SUFFIX = ".crc32.json"  # the checksum file beside each pickle the harness writes


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Datum:
    """One image: its path, integer label, class name and domain (always 0 here)."""

    impath: str
    label: int
    classname: str
    domain: int = 0


class DatasetError(Exception):
    """A dataset folder, split file or cache is missing or broken.

    The message says what is wrong, the layout that was expected and how to fix it.
    """


class UnsafePickleError(DatasetError, pickle.UnpicklingError):
    """A cache pickle asked for a class outside the small allow-list."""


class DamagedCacheError(DatasetError):
    """A cache pickle fails the checksum file written beside it: its bytes changed after
    the harness wrote them.  ``path`` is the pickle, ``problem`` what fails."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"Cache file {path} is damaged ({problem}).\n"
                         f"Delete it and {os.path.basename(checksum_path(path))}; it is rebuilt on the next run.")


@dataclass
class DatasetSplits:
    """The splits of one dataset as a run sees them (few-shot drawn, classes subsampled).

    ``classnames`` lists the train set's class names by label, as the reference ``lab2cname``
    does, so it is what text classifiers are built from.
    """

    name: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]
    dataset_dir: str = ""  # absolute folder the data was read from
    num_shots: int = 0
    seed: int = 0
    subsample: str = "all"
    fewshot_cache: str | None = field(default=None, repr=False)  # pickle used or written
    # classes with test images but no training images: class name -> test images.  As the
    # reference code derives the classes from the training labels, base/new subsampling
    # leaves these classes (and their test images) out; the run warns and records them.
    classes_without_training_images: dict[str, int] = field(default_factory=dict)
    # every class of the dataset by label, before base/new subsampling (train, val and test
    # lists together, as the LASP code's ``get_all_classnames``): the names a method may use
    # without their images (LASP-V's virtual classes)
    all_classnames: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        # officially max(label) + 1 over train; equal to len(classnames) after relabelling
        if not self.train:
            return len(self.classnames)
        return max(d.label for d in self.train) + 1

    @property
    def lab2cname(self) -> dict[int, str]:
        return label_names(self.train)


def classes_without_training_images(train: Sequence[Datum], test: Sequence[Datum]) -> dict[str, int]:
    """Classes (by label) that have test images but no training image: name -> test images."""
    trained = {d.label for d in train}
    counts: dict[int, int] = {}
    names: dict[int, str] = {}
    for d in test:
        if d.label not in trained:
            counts[d.label] = counts.get(d.label, 0) + 1
            names.setdefault(d.label, d.classname)
    return {names[label]: counts[label] for label in sorted(counts)}


def conflicting_labels(*splits: Sequence[Datum]) -> list[str]:
    """Labels that name different classes in different splits (e.g. a class folder missing
    from one split shifts every later label of that split)."""
    seen: dict[int, str] = {}
    problems = []
    for split in splits:
        for label, name in label_names(split).items():
            if seen.setdefault(label, name) != name:
                problems.append(f"label {label} is {seen[label]!r} in one split and {name!r} in another")
    return problems


def label_names(data: Iterable[Datum]) -> dict[int, str]:
    """Map label -> class name, sorted by label (the reference ``get_lab2cname``)."""
    mapping = {d.label: d.classname for d in data}
    return {label: mapping[label] for label in sorted(mapping)}


# --------------------------------------------------------------------------- sampling


def group_by_label(data: Iterable[Datum]) -> dict[int, list[Datum]]:
    """Group items by label; groups keep the order in which labels first appear."""
    groups: dict[int, list[Datum]] = {}
    for item in data:
        groups.setdefault(item.label, []).append(item)
    return groups


def generate_fewshot(
    data: Sequence[Datum], num_shots: int, rng: random.Random, *, repeat: bool = False
) -> list[Datum]:
    """Draw ``num_shots`` items per label, exactly as the reference ``generate_fewshot_dataset``.

    Labels are visited in order of first appearance in ``data`` (not sorted). A label
    with at least K items gets ``rng.sample(items, K)``; a smaller one keeps all its items
    and consumes no randomness (with ``repeat``, ``rng.choices(items, k=K)`` instead).
    ``num_shots < 1`` returns the data unchanged.
    """
    if num_shots < 1:
        return list(data)
    out: list[Datum] = []
    for items in group_by_label(data).values():
        if len(items) >= num_shots:
            out.extend(rng.sample(items, num_shots))
        elif repeat:
            out.extend(rng.choices(items, k=num_shots))
        else:
            out.extend(items)
    return out


def subsample_classes(*splits: Sequence[Datum], subsample: str = "all") -> tuple[list[Datum], ...]:
    """Keep the base or new half of the classes, as the official ``subsample_classes``.

    The labels are taken from the first split (train). With n of them, the first
    ``ceil(n / 2)`` in ascending order are base and the rest new. Every split keeps only
    the selected labels, relabelled 0.. in ascending original order; item order and class
    names are kept. ``"all"`` returns the splits unchanged.
    """
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    if subsample == "all" or not splits:
        return tuple(list(s) for s in splits)
    labels = sorted({d.label for d in splits[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}
    return tuple(
        [replace(d, label=relabel[d.label]) for d in split if d.label in relabel]
        for split in splits
    )


# --------------------------------------------------------------------------- split files


def read_split_json(
    path: str | Path, prefix: str | Path
) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """Read a ``split_zhou_<Name>.json`` file; paths are joined to ``prefix``.

    Labels are cast with ``int`` and class names come from the file, as officially.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            split = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"Split file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"Split file {path} could not be read as JSON ({e}).\n"
            "Replace it with a fresh copy of the official split file."
        ) from None
    if not isinstance(split, dict) or not all(k in split for k in ("train", "val", "test")):
        raise DatasetError(f"Split file {path} must be a JSON object with keys train, val and test.")
    prefix = str(prefix)
    train, val, test = (_split_items(split[k], k, path, prefix) for k in ("train", "val", "test"))
    return train, val, test


def _split_items(rows: Any, key: str, path: str, prefix: str) -> list[Datum]:
    out = []
    for i, row in enumerate(rows):
        try:
            impath, label, classname = row
            out.append(Datum(os.path.join(prefix, impath), int(label), str(classname)))
        except (TypeError, ValueError):
            raise DatasetError(
                f"Split file {path}: entry {i} of {key!r} is {row!r}, "
                "expected [relative image path, integer label, class name]."
            ) from None
    return out


# --------------------------------------------------------------------------- official pickles


class _DasslDatum:
    """Stand-in for the official ``Datum`` class when reading and writing its pickles.

    Unpickling fills ``__dict__`` with ``_impath, _label, _domain, _classname``; the
    constructor (which checks that the file exists) is never called.
    """

    def __init__(self, impath: str = "", label: int = 0, domain: int = 0, classname: str = ""):
        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # protocol 0/1 pickles build objects through copyreg._reconstructor; only our shim
    if cls is not _DasslDatum or base is not object or state is not None:
        raise UnsafePickleError("refusing copyreg._reconstructor for anything but the official Datum")
    return object.__new__(cls)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    (DASSL_DATUM_MODULE, DASSL_DATUM_NAME): _DasslDatum,
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): defaultdict,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    **{("builtins", t.__name__): t for t in (dict, list, tuple, set, frozenset, object,
                                             str, bytes, int, float, bool)},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the official ``Datum`` (to a shim) and plain containers.

    A pickle can name any importable callable and have it called; a cache file copied
    from elsewhere must not be able to run code, so every other global is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # names written by Python 2
            module = "builtins"
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load '{module}.{name}': a dataset cache may only hold "
                f"{DASSL_DATUM_MODULE}.{DASSL_DATUM_NAME} records in dicts and lists"
            ) from None


class _DasslPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickler that writes our shim under the official class path.

    The C pickler insists that a class be importable under the name it writes, and the
    official package is not installed; the Python pickler lets us write the reference.
    """

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is not _DasslDatum:
            return super().save_global(obj, name)
        if self.proto >= 4:
            self.save(DASSL_DATUM_MODULE)
            self.save(DASSL_DATUM_NAME)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{DASSL_DATUM_MODULE}\n{DASSL_DATUM_NAME}\n".encode())
        self.memoize(obj)


def _path_parts(path: str) -> list[str]:
    # paths may come from another OS; split on both separators
    return [p for p in re.split(r"[\\/]+", path) if p]


class _Rebaser:
    """Moves stored image paths under the current ``dataset_dir``.

    The dataset folder's name is looked up in the stored path and what follows it is
    joined to ``dataset_dir``. Where the name occurs more than once, the occurrence
    followed by the image root's first part wins, else the last one. Paths of one cache
    share their prefix, so the prefix found for one path is tried first on the next.
    """

    def __init__(self, dataset_dir: str, images: str = ""):
        self.dataset_dir = dataset_dir
        self.folder = os.path.basename(os.path.normpath(dataset_dir))
        self.first = _path_parts(images)[0] if images else None
        self.prefix: str | None = None

    def __call__(self, stored: str) -> str:
        if self.prefix and stored.startswith(self.prefix):
            rest = stored[len(self.prefix):]
            if os.sep == "/" and "\\" not in rest and "//" not in rest:
                return self.dataset_dir + "/" + rest  # fast path: ImageNet holds 1.3M paths
        else:
            rest = self._locate(stored)
        return os.path.join(self.dataset_dir, *_path_parts(rest))

    def _locate(self, stored: str) -> str:
        parts = _path_parts(stored)
        hits = [i for i, p in enumerate(parts) if p == self.folder]
        preferred = [i for i in hits if self.first and i + 1 < len(parts) and parts[i + 1] == self.first]
        if hits:
            i = (preferred or hits)[-1]
            # remember the prefix up to and including the folder (with its separator)
            m = re.match(r"^(?:[\\/]*[^\\/]+){%d}[\\/]+" % (i + 1), stored)
            self.prefix = m.group(0) if m else None
            return "/".join(parts[i + 1:])
        if not _is_absolute(stored):
            return stored
        raise DatasetError(
            f"Cannot place the cached path {stored!r} under {self.dataset_dir}: "
            f"the folder name {self.folder!r} does not occur in it.\n"
            "Delete the cache file so that it is rebuilt from the split files."
        )


def _is_absolute(path: str) -> bool:
    return path.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", path))


def checksum_path(path: str | Path) -> str:
    """The checksum file of the cache pickle ``path`` (``<path>.crc32.json``)."""
    return str(path) + CHECKSUM_SUFFIX


def _checksum_problem(path: str, raw: bytes) -> str | None:
    """Why ``raw`` (the bytes of the pickle ``path``) fails its checksum file, or None when
    it passes or has none."""
    sidecar = checksum_path(path)
    name = os.path.basename(sidecar)
    try:
        with open(sidecar, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None  # written by the official code or an older harness: read as it is
    except (OSError, UnicodeDecodeError) as e:
        return f"its checksum file {name} cannot be read: {e}"
    try:
        stored = json.loads(text)
        algorithm, want, size = stored["algorithm"], str(stored["checksum"]), int(stored["size"])
    except (ValueError, TypeError, KeyError):
        return f"its checksum file {name} is not a valid checksum record"
    if algorithm != CHECKSUM:
        return f"its checksum file {name} names the algorithm {algorithm!r}, not {CHECKSUM!r}"
    if len(raw) != size:
        return f"it holds {len(raw)} bytes, not the {size} recorded in {name}"
    if checksum(raw) != want:
        return f"its bytes fail the CRC-32 recorded in {name}"
    return None


def read_dassl_pickle(path: str | Path, dataset_dir: str | Path, images: str = "") -> dict[str, list[Datum]]:
    """Read an official cache pickle (``split_fewshot/*.pkl``, ``preprocessed.pkl``).

    Returns a dict of split name -> list of ``Datum``, with each image path moved under
    ``dataset_dir`` (see ``_Rebaser``). ``images`` is the image root relative to the
    dataset folder; it only helps where the folder name occurs twice in a stored path.
    Where the pickle has a checksum file (``checksum_path``), its bytes are checked
    before they are unpickled: ``DamagedCacheError`` when they fail it.
    Raises ``DatasetError`` (``UnsafePickleError`` for a disallowed class) on a bad file.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()  # one read: the bytes checked are the bytes unpickled
    except OSError as e:
        raise DatasetError(f"Cache file {path} could not be read ({type(e).__name__}: {e}).\n"
                           "Delete it; it is rebuilt from the dataset on the next run.") from None
    problem = _checksum_problem(path, raw)
    if problem is not None:
        raise DamagedCacheError(path, problem)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except DatasetError as e:
        raise type(e)(f"{path}: {e}") from None
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError,
            IndexError) as e:  # what a truncated or foreign file raises
        raise DatasetError(
            f"Cache file {path} could not be read ({type(e).__name__}: {e}).\n"
            "Delete it; it is rebuilt from the dataset on the next run."
        ) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"Cache file {path} holds a {type(obj).__name__}, expected a dict of lists.")
    rebase = _Rebaser(os.path.abspath(str(dataset_dir)), images)
    try:
        return {str(k): _from_dassl(v, k, path, rebase) for k, v in obj.items()}
    except DatasetError as e:
        if path in str(e):
            raise
        raise DatasetError(f"Cache file {path}: {e}") from None


def _from_dassl(items: Any, key: Any, path: str, rebase: _Rebaser) -> list[Datum]:
    if not isinstance(items, list):
        raise DatasetError(f"Cache file {path}: {key!r} holds a {type(items).__name__}, expected a list.")
    out = []
    for item in items:
        state = getattr(item, "__dict__", None)
        if not isinstance(item, _DasslDatum) or not isinstance(state.get("_impath"), str):
            raise DatasetError(f"Cache file {path}: {key!r} holds {item!r}, expected Datum records.")
        out.append(Datum(
            impath=rebase(state["_impath"]),
            label=int(state.get("_label", 0)),
            classname=str(state.get("_classname", "")),
            domain=int(state.get("_domain", 0)),
        ))
    return out


def write_dassl_pickle(obj: dict[str, Sequence[Datum]], path: str | Path) -> None:
    """Write a cache the official code can read: a dict of lists of its ``Datum`` objects,
    and its checksum file (``checksum_path``).

    Paths are stored absolute, with ``pickle.HIGHEST_PROTOCOL``.  Each file is written to a
    temporary name in the same folder and renamed, so readers never see half a file; the
    checksum file goes first, so that a write killed between the two leaves a checksum
    file without its pickle (drawn again) or a damaged pickle that fails the new checksum
    (computed again), never a pickle the harness wrote without its checksum.
    """
    payload = {k: [_to_dassl(d) for d in v] for k, v in obj.items()}
    buf = io.BytesIO()
    _DasslPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
    raw = buf.getvalue()
    write_json_atomic(checksum_path(path), {"algorithm": CHECKSUM, "checksum": checksum(raw), "size": len(raw)})
    write_bytes_atomic(path, raw)


def _to_dassl(d: Datum) -> _DasslDatum:
    return _DasslDatum(os.path.abspath(d.impath), int(d.label), int(d.domain), d.classname)
