"""Dataset catalogue and loading compatible with the official data folders.

``build_dataset("oxford_pets", root, num_shots=16, seed=1, subsample="base")`` returns the
same train/val/test lists, in the same order, as the official code for that run, from
the same folders, split files and few-shot caches.

This package is named ``datasets`` on purpose and shadows the third-party package of
that name inside the project; import from it explicitly (``from datasets.build import
build_dataset``). The fake-data writers live in ``datasets.synthetic`` and are not imported here.
"""

from datasets.base import (
    DatasetError,
    DatasetSplits,
    Datum,
    UnsafePickleError,
    generate_fewshot,
    read_dassl_pickle,
    read_split_json,
    subsample_classes,
    write_dassl_pickle,
)
from datasets.build import build_dataset, fewshot_cache_path
from datasets.catalog import (
    BASE2NOVEL_DATASETS,
    CATALOG,
    CROSS_DATASET_TARGETS,
    DG_DATASETS,
    Spec,
    UnknownDatasetError,
    check_dataset,
    get_spec,
    list_datasets,
    resolve_name,
)

__all__ = [
    "BASE2NOVEL_DATASETS", "CATALOG", "CROSS_DATASET_TARGETS", "DG_DATASETS",
    "DatasetError", "DatasetSplits", "Datum", "Spec", "UnknownDatasetError", "UnsafePickleError",
    "build_dataset", "check_dataset", "fewshot_cache_path", "generate_fewshot", "get_spec",
    "list_datasets", "read_dassl_pickle", "read_split_json", "resolve_name",
    "subsample_classes", "write_dassl_pickle",
]
