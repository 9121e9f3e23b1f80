"""Reading checkpoints written by the official trainers without executing foreign code.

Official checkpoints are ``torch.save`` dicts with ``state_dict``, ``epoch``,
``optimizer``, ``scheduler`` and ``val_result``.  With a warm-up, the scheduler's state
holds a pickled torch scheduler *object* (its successor, which itself holds the
optimizer), which ``torch.load(weights_only=True)`` refuses.  Such files are read
through a restricted unpickler instead: it admits only torch's tensor rebuilders and
storages, torch's own optimiser and scheduler classes, plain containers and numpy
scalars; any other class stops the load with an error naming it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

_ALLOWED_EXACT = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "set"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("torch", "Size"), ("torch", "device"),
    ("torch", "dtype"), ("torch", "float16"), ("torch", "float32"), ("torch", "bfloat16"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("numpy.dtypes", "Float64DType"), ("numpy.dtypes", "Float32DType"), ("numpy.dtypes", "Int64DType"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    pass


def _allowed(module: str, name: str) -> bool:
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
    if (module, name) in _ALLOWED_EXACT:
        return True
    if module == "torch":
        return name.endswith("Storage")
    if module == "torch._utils":
        return name.startswith("_rebuild")
    return module.startswith("torch.optim.") and not name.startswith("_")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise UnsafeCheckpointError(
                f"the checkpoint refers to {module}.{name}, which a checkpoint of tensors, optimiser "
                f"and scheduler state does not need; refusing to load it")
        return super().find_class(module, name)


class _RestrictedPickle:
    """A stand-in for the pickle module that torch.load accepts as ``pickle_module``."""

    Unpickler = _RestrictedUnpickler
    __name__ = "restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load`` on CPU: weights-only when the file allows it, else restricted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
