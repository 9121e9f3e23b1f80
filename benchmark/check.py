"""``python run.py check --root DATA``: is every dataset there, whole, and readable?

Per dataset: present, partial or missing; the folders and index files it lacks; the
number of classes and of images per split, read through the same loaders a run uses;
how many listed images are absent on disk (every file is looked up, none is decoded);
and what to do about what is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass
class DatasetReport:
    name: str
    status: str  # "ready", "missing", "incomplete"
    classes: int = 0
    images: dict[str, int] = field(default_factory=dict)  # split -> listed images
    missing_images: int = 0
    examples: list[str] = field(default_factory=list)  # a few absent files
    problems: list[str] = field(default_factory=list)
    fix: str = ""


def check_one(name: str, root: str | Path) -> DatasetReport:
    from datasets.base import DatasetError, build_dataset
    from datasets.catalog import check_dataset, dataset_error

    problems = check_dataset(name, root)
    if problems:
        missing_folder = len(problems) == 1 and problems[0].startswith("missing dataset folder")
        return DatasetReport(name, "missing" if missing_folder else "incomplete", problems=problems,
                             fix=_fix(str(dataset_error(name, root, problems))))
    try:
        splits = build_dataset(name, root, num_shots=0)
    except (DatasetError, OSError, ValueError) as exc:
        return DatasetReport(name, "incomplete", problems=[str(exc).splitlines()[0]], fix=_fix(str(exc)))
    report = DatasetReport(name, "ready", classes=len(splits.classnames))
    absent = []
    for split in ("train", "val", "test"):
        items = getattr(splits, split)
        report.images[split] = len(items)
        absent += [d.impath for d in items if not os.path.isfile(d.impath)]
    if absent:
        report.status = "incomplete"
        report.missing_images = len(absent)
        report.examples = absent[:3]
        report.problems.append(f"{len(absent)} listed images are not on disk")
        report.fix = ("Re-extract the image archive into the dataset folder (the split file lists images "
                      "that are not there), or replace the split file with the one the images came with.")
    return report


def _fix(message: str) -> str:
    lines = [line for line in message.splitlines() if line.startswith("To fix")]
    return lines[0] if lines else message.splitlines()[-1]


def check_root(root: str | Path, names: Sequence[str] | None = None) -> list[DatasetReport]:
    from datasets.catalog import list_datasets, resolve_name

    return [check_one(resolve_name(n), root) for n in (names or list_datasets())]


def missing_eval_images(name: str, root: str | Path) -> list[str]:
    """Test and validation images listed by ``name``'s split files but absent on disk (a
    sweep checks these up front: every run of the dataset would evaluate on them)."""
    from datasets.base import build_dataset

    splits = build_dataset(name, root, num_shots=0)
    return [d.impath for d in list(splits.test) + list(splits.val) if not os.path.isfile(d.impath)]
