"""A run's splits of one dataset, as an official run builds them: the catalogue's reader,
the few-shot draw (and its cache), then the base or new half of the classes.

``build_dataset("oxford_pets", root, num_shots=16, seed=1, subsample="base")`` returns the
same train/val/test lists, in the same order, as the official code for that run, from
the same folders, split files and few-shot caches.  A cached draw that fails the
checksum file the harness wrote beside it is drawn again, with a warning, and rewritten
(see ``datasets.base``).  This module sits above both ``datasets.base`` (records,
sampling, pickles) and ``datasets.catalog`` (the table).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from datasets.base import (
    SUBSAMPLE_CHOICES,
    DamagedCacheError,
    DatasetError,
    DatasetSplits,
    Datum,
    Splits,
    classes_without_training_images,
    conflicting_labels,
    generate_fewshot,
    label_names,
    read_dassl_pickle,
    subsample_classes,
    write_dassl_pickle,
)
from datasets.catalog import Spec, check_dataset, dataset_error, get_spec, resolve_name

log = logging.getLogger(__name__)

FEWSHOT_DIR = "split_fewshot"


def fewshot_cache_path(dataset_dir: str | Path, num_shots: int, seed: int) -> str:
    """Where the official code caches a few-shot draw (shared by base, new and all)."""
    return os.path.join(str(dataset_dir), FEWSHOT_DIR, f"shot_{num_shots}-seed_{seed}.pkl")


def read_splits(name: str, root: str | Path, *, write_caches: bool = True) -> tuple[Spec, str, Splits]:
    """Every image of ``name``'s train, val and test splits with their original labels, as
    the files list them: (catalogue row, dataset folder, (train, val, test)).  Raises
    ``DatasetError`` with the expected layout when folders or index files are missing.
    ``write_caches=False`` (``check``) writes no cache file (ImageNet's file lists)."""
    spec = get_spec(name)
    dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(str(root))), spec.folder)
    problems = check_dataset(name, root)
    if problems:
        raise dataset_error(name, root, problems)
    return spec, dataset_dir, spec.read(dataset_dir, write_caches=write_caches)


def split_problems(name: str, spec: Spec, dataset_dir: str, splits: Splits, *, strict: bool) -> str | None:
    """What keeps the splits' classes from fitting together, as one message with the fix,
    or None.  Labels that name different classes in different splits are always a
    problem; classes with test images but no training image only when ``strict`` (the
    whole class list is used, which comes from the training labels)."""
    train, val, test = splits
    if spec.test_only:
        return None
    problems = conflicting_labels(train, val, test)
    absent = classes_without_training_images(train, test)
    if absent and strict:
        problems.insert(0, f"{len(absent)} class(es) have test images but no training images: "
                           f"{_listed(absent)}; the class list comes from the training labels, so it would not "
                           "match the test labels")
    if not problems:
        return None
    cache = os.path.join(dataset_dir, "preprocessed.pkl")
    stale = (f"\nThe file lists were read from {cache}, a cache of an earlier scan of the folders: if the "
             "folders were fixed since, delete that file so that they are scanned again."
             if spec.val_is_test and os.path.exists(cache) else "")
    return (f"Dataset {name!r} has inconsistent splits: " + "; ".join(problems[:5]) + "." + stale +
            "\nTo fix: restore the training images (or the split file's train list) of these classes, or use "
            "the official split file.")


def _listed(absent: dict[str, int]) -> str:
    text = ", ".join(f"{c!r} ({n} test images)" for c, n in list(absent.items())[:5])
    return text + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")


def build_dataset(
    name: str, root: str | Path, num_shots: int = 0, seed: int = 1, subsample: str = "all", *,
    write_caches: bool = True,
) -> DatasetSplits:
    """Load ``name`` from the official folder layout under ``root``, as an official run does.

    Steps: read all splits; if ``num_shots >= 1`` load the cached draw, or draw train
    (K shots) then val (min(K, 4)) from one ``random.Random(seed)`` and cache it (ImageNet:
    train only); then keep the ``subsample`` half of the classes. ImageNet's val is its
    test set; the four ImageNet variants are test-only (train = test = all images, no val)
    and ignore ``num_shots`` and ``subsample``, as officially.

    Classes come from the training labels, as in the reference code.  A class with test
    images but no training image is therefore left out by base/new subsampling, with its
    test images: that is done as officially, with a warning, and listed in
    ``classes_without_training_images``.  With ``subsample="all"`` such a class would
    leave the class list and the test labels out of step, so it is an error
    (``split_problems``), as are labels that name different classes in different splits.
    """
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    name = resolve_name(name)  # official DATASET.NAME spellings are accepted too
    spec, dataset_dir, (train, val, test) = read_splits(name, root, write_caches=write_caches)
    result = DatasetSplits(name=name, train=train, val=val, test=test, classnames=[],
                           dataset_dir=dataset_dir, num_shots=num_shots, seed=seed, subsample=subsample)
    if spec.test_only:
        result.train, result.val, result.test = test, [], test
    else:
        problem = split_problems(name, spec, dataset_dir, (train, val, test), strict=subsample == "all")
        if problem:
            raise DatasetError(problem)
        absent = result.classes_without_training_images = classes_without_training_images(train, test)
        if absent:
            log.warning("%s: %d class(es) have test images but no training images: %s. As in the reference code "
                        "the classes come from the training labels, so the %s classes leave them out, with their "
                        "%d test images; the record lists them (train.classes_without_training_images).", name,
                        len(absent), _listed(absent), subsample, sum(absent.values()))
        if num_shots >= 1:
            train, val, result.fewshot_cache = _fewshot(spec, dataset_dir, train, val, num_shots, seed,
                                                        write_cache=write_caches)
        result.all_classnames = list(label_names([*train, *val, *test]).values())
        if spec.val_is_test:
            train, test = subsample_classes(train, test, subsample=subsample)
            val = test
        else:
            train, val, test = subsample_classes(train, val, test, subsample=subsample)
        result.train, result.val, result.test = train, val, test
    result.classnames = list(label_names(result.train).values())
    if spec.test_only:
        result.all_classnames = list(result.classnames)
    return result


def _fewshot(spec: Spec, dataset_dir: str, train: list[Datum], val: list[Datum],
             num_shots: int, seed: int, *, write_cache: bool = True) -> tuple[list[Datum], list[Datum], str | None]:
    """Load or draw (and cache) the few-shot train/val lists, original labels kept.  A
    cached draw that fails its checksum file (one the harness wrote) is drawn again, with
    one warning naming the file, and rewritten; one without a checksum file (written by
    the official code) is used as it is."""
    path = fewshot_cache_path(dataset_dir, num_shots, seed)
    if os.path.exists(path):
        log.info("Loading few-shot split from %s", path)
        try:
            cached = read_dassl_pickle(path, dataset_dir, spec.images)
        except DamagedCacheError as damage:  # the draw is a function of the seed: drawn again
            log.warning("The few-shot draw %s is damaged (%s); drawing it again from seed %d%s.", path,
                        damage.problem, seed, " and rewriting it" if write_cache else "")
        else:
            if "train" not in cached or (not spec.val_is_test and "val" not in cached):
                raise DatasetError(f"Cache file {path} lacks the train/val lists; delete it to redraw.")
            return cached["train"], cached.get("val", val), path
    rng = random.Random(seed)  # = the official fresh `random.seed(seed)` stream
    train = generate_fewshot(train, num_shots, rng)
    payload = {"train": train}
    if not spec.val_is_test:  # ImageNet draws no val; its val is the test set
        val = generate_fewshot(val, min(num_shots, 4), rng)
        payload["val"] = val
    if not write_cache:
        return train, val, None
    try:
        write_dassl_pickle(payload, path)
        log.info("Saved few-shot split to %s", path)
    except OSError as e:
        # a read-only data folder should not stop a run; the draw is deterministic anyway
        log.warning("Could not write the few-shot cache %s (%s); continuing without it", path, e)
        return train, val, None
    return train, val, path
