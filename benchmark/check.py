"""``python run.py check --root DATA``: is every dataset there, whole, and readable?

Per dataset: present, partial or missing; the folders and index files it lacks; the
number of classes and of images per split, read through the same loaders a run uses;
how many listed images are absent on disk (every file is looked up, none is decoded);
and what to do about what is missing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)


@dataclass
class DatasetReport:
    name: str
    status: str  # "ready", "missing", "incomplete"
    classes: int = 0
    images: dict[str, int] = field(default_factory=dict)  # split -> listed images
    missing_images: int = 0
    examples: list[str] = field(default_factory=list)  # a few absent files
    untrained_classes: dict[str, int] = field(default_factory=dict)  # in test, absent from train -> test images
    problems: list[str] = field(default_factory=list)
    fix: str = ""


def check_one(name: str, root: str | Path) -> DatasetReport:
    """The state of one dataset.  Nothing is written: a check of a broken folder must not
    leave a cache (ImageNet's file lists) that would outlive the fix."""
    from datasets.base import DatasetError, classes_without_training_images
    from datasets.build import read_splits, split_problems
    from datasets.catalog import check_dataset, dataset_error

    problems = check_dataset(name, root)
    if problems:
        missing_folder = len(problems) == 1 and problems[0].startswith("missing dataset folder")
        return DatasetReport(name, "missing" if missing_folder else "incomplete", problems=problems,
                             fix=_fix(str(dataset_error(name, root, problems))))
    try:
        spec, dataset_dir, splits = read_splits(name, root, write_caches=False)
    except (DatasetError, OSError, ValueError) as exc:
        return DatasetReport(name, "incomplete", problems=[str(exc).splitlines()[0]], fix=_fix(str(exc)))
    train, val, test = splits
    if spec.test_only:
        train = test
    report = DatasetReport(name, "ready", classes=len({d.label for d in train}))
    absent = []
    for split, items in zip(("train", "val", "test"), (train, val, test)):
        report.images[split] = len(items)
        absent += [d.impath for d in items if not os.path.isfile(d.impath)]
    if absent:
        report.status = "incomplete"
        report.missing_images = len(absent)
        report.examples = absent[:3]
        report.problems.append(f"{len(absent)} listed images are not on disk")
        report.fix = ("Re-extract the image archive into the dataset folder (the split file lists images "
                      "that are not there), or replace the split file with the one the images came with.")
    untrained = {} if spec.test_only else classes_without_training_images(train, test)
    if untrained:
        report.status = "incomplete"
        report.untrained_classes = untrained
        listed = ", ".join(list(untrained)[:3]) + (" ..." if len(untrained) > 3 else "")
        report.problems.append(f"{len(untrained)} classes in test but absent from train ({listed}): "
                               f"base/new runs leave out their {sum(untrained.values())} test images, "
                               "whole-dataset runs stop")
    problem = split_problems(name, spec, dataset_dir, splits, strict=True)
    if problem:
        report.status = "incomplete"
        if not untrained:
            report.problems.append(problem.splitlines()[0])
        report.fix = " ".join(line for line in problem.splitlines()[1:])
    return report


def _fix(message: str) -> str:
    lines = [line for line in message.splitlines() if line.startswith("To fix")]
    return lines[0] if lines else message.splitlines()[-1]


def check_root(root: str | Path, names: Sequence[str] | None = None) -> list[DatasetReport]:
    from datasets.catalog import list_datasets, resolve_name

    return [check_one(resolve_name(n), root) for n in (names or list_datasets())]


def sweep_problems(uses: dict[str, set[str]], root: str | Path) -> tuple[list[str], list[str]]:
    """What stops a sweep before any run, and what it should warn about, for the datasets
    it uses (name -> the class subsets it uses: all, base, new): test and validation images
    listed but absent on disk (every run of the dataset would evaluate on them), splits
    whose classes do not fit together, and classes with test images but no training
    images (an error where the whole class list is used, a warning for base/new runs,
    which leave them out as the reference code does)."""
    from datasets.base import classes_without_training_images
    from datasets.build import read_splits, split_problems

    errors, warnings = [], []
    for name, subsamples in uses.items():
        spec, dataset_dir, splits = read_splits(name, root)
        train, val, test = splits
        absent = [d.impath for d in list(test) + list(val) if not os.path.isfile(d.impath)]
        if absent:
            errors.append(f"{name}: {len(absent)} test or validation images listed in its split file are not "
                          f"on disk, e.g. {absent[0]}. Re-extract the images into the dataset folder (or use the "
                          "split file that came with them).")
        problem = split_problems(name, spec, dataset_dir, splits, strict="all" in subsamples)
        if problem:
            errors.append(problem)
        elif not spec.test_only:
            untrained = classes_without_training_images(train, test)
            if untrained:
                warnings.append(f"{name}: {len(untrained)} class(es) have test images but no training images "
                                f"({', '.join(list(untrained)[:3])}); as in the reference code, base/new runs "
                                f"leave them out with their {sum(untrained.values())} test images (recorded in "
                                "each record's train.classes_without_training_images).")
    return errors, warnings


def check_sweep_data(specs, root: str | Path) -> None:
    """Every dataset the sweep uses, before any run: folders and index files, test images on
    disk, classes that fit together; one error listing everything that is wrong."""
    from datasets.base import DatasetError
    from datasets.catalog import check_dataset, dataset_error

    uses: dict[str, set[str]] = {}
    for spec in specs:
        uses.setdefault(spec.dataset, set()).add(spec.subsample)
        for ev in spec.evals:
            uses.setdefault(ev.dataset, set()).add(ev.subsample)
    uses = dict(sorted(uses.items()))
    problems = {name: check_dataset(name, root) for name in uses}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        messages = [str(dataset_error(name, root, p)) for name, p in problems.items()]
        raise DatasetError("\n\n".join(messages) + f"\n\n{len(problems)} of {len(uses)} datasets "
                           "are not ready. Fix them, or leave them out with --datasets.")
    errors, warnings = sweep_problems(uses, root)
    for warning in warnings:
        log.warning("%s", warning)
    if errors:
        raise DatasetError("\n".join(errors) + f"\n`python run.py check --root {root}` lists every dataset's "
                           "state.")
