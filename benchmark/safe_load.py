"""Reading checkpoints written by the official trainers without executing foreign code.

Official checkpoints are ``torch.save`` dicts with ``state_dict``, ``epoch``,
``optimizer``, ``scheduler`` and ``val_result``.  With a warm-up, the scheduler's state
holds a pickled torch scheduler *object* (its successor, which itself holds the
optimizer), which ``torch.load(weights_only=True)`` refuses.  Such files are read
through a restricted unpickler instead.

The restricted unpickler resolves a global only through ``ALLOWED_GLOBALS``, an exact
mapping ``(module, name) -> object`` built here from objects this module imports.  It
never imports a module or looks an attribute up by the names in the file: a name with
a dot in it (which the standard unpickler would follow as an attribute path, e.g.
``torch.serialization.os.system``) is refused, and so is every pair not in the
mapping.  After loading, the result is walked once more: a checkpoint holds data, so
any callable in it (a smuggled class or function, a tensor hook, a ``defaultdict``
factory other than ``dict``) is refused as well.
"""

from __future__ import annotations

import _codecs
import collections
import pickle
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.optim
import torch.optim.lr_scheduler as _sched

# Optimisers by class name, with the submodule that defines them (and under which
# torch.save has always pickled them: ``torch.optim.sgd SGD``).
_OPTIMIZERS = {
    "SGD": "sgd", "Adam": "adam", "AdamW": "adamw", "Adamax": "adamax", "Adadelta": "adadelta",
    "Adagrad": "adagrad", "ASGD": "asgd", "NAdam": "nadam", "RAdam": "radam", "RMSprop": "rmsprop",
    "Rprop": "rprop", "SparseAdam": "sparse_adam", "LBFGS": "lbfgs",
}
# Schedulers that hold no user function.  Left out: LambdaLR and MultiplicativeLR (they
# hold the user's function) and CyclicLR (it pickles a bound method through getattr).
_SCHEDULERS = (
    "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
    "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "OneCycleLR", "ReduceLROnPlateau",
    "SequentialLR", "ChainedScheduler",
)
# Legacy typed storages, as named in torch.save's persistent ids (torch.load resolves
# these names itself before asking the unpickler; listed for completeness).
_STORAGES = (
    "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage",
    "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "ComplexFloatStorage",
    "ComplexDoubleStorage",
)
_DTYPES = (
    "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
    "complex64", "complex128",
)


def _build_allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for name, submodule in _OPTIMIZERS.items():
        cls = getattr(torch.optim, name, None)
        if cls is not None:
            for module in {cls.__module__, f"torch.optim.{submodule}", "torch.optim"}:
                allowed[(module, name)] = cls
    for name in _SCHEDULERS:
        cls = getattr(_sched, name, None)
        if cls is not None:
            for module in {cls.__module__, "torch.optim.lr_scheduler"}:
                allowed[(module, name)] = cls
    # Tensor rebuilders torch.save writes for plain tensors and parameters.
    for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in _STORAGES + _DTYPES + ("Size", "device"):
        if hasattr(torch, name):
            allowed[("torch", name)] = getattr(torch, name)
    # Containers; protocol 2 (torch.save's default) spells builtins "__builtin__".
    for module in ("builtins", "__builtin__"):
        allowed.update({(module, "dict"): dict, (module, "set"): set, (module, "frozenset"): frozenset})
    allowed.update({("collections", "OrderedDict"): collections.OrderedDict,
                    ("collections", "defaultdict"): collections.defaultdict,
                    ("collections", "Counter"): collections.Counter,  # MultiStepLR's milestones
                    ("_codecs", "encode"): _codecs.encode})  # bytes under protocol 2
    try:  # numpy scalars (a val_result computed with numpy)
        import numpy

        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy 1.x
            from numpy.core.multiarray import scalar
        allowed.update({("numpy._core.multiarray", "scalar"): scalar,
                        ("numpy.core.multiarray", "scalar"): scalar, ("numpy", "dtype"): numpy.dtype})
    except ImportError:
        pass
    return allowed


ALLOWED_GLOBALS: MappingProxyType = MappingProxyType(_build_allowed())
_FACTORIES = (None, dict)  # defaultdict factories a checkpoint may hold (the optimiser's state)


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint names (or holds) something outside the allow-list; nothing was run."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Never the standard find_class: it imports ``module`` and follows dotted names.
        # (torch.load's own subclass resolves storage names and renames torch.tensor to
        # torch._tensor before calling this; neither adds anything to the allow-list.)
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeCheckpointError(f"the file names a global with a non-string module or name "
                                        f"({module!r}, {name!r}); refused, nothing was imported or run")
        if "." in name:
            raise UnsafeCheckpointError(
                f"the file refers to {name!r} in module {module!r}: dotted names are refused (the "
                f"standard unpickler would follow them as an attribute path to another object); "
                f"nothing was imported or run")
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the file refers to {module}.{name}, which is not on the allow-list of objects a "
                f"checkpoint of tensors, optimiser and scheduler state may name; refused, nothing "
                f"was imported or run") from None


class _RestrictedPickle:
    """A stand-in for the pickle module that torch.load accepts as ``pickle_module``."""

    Unpickler = _RestrictedUnpickler
    __name__ = "restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def _refuse_callables(obj: Any) -> None:
    """Walk what was loaded: data only, no callables, no tensor hooks."""
    allowed_types = {v for v in ALLOWED_GLOBALS.values() if isinstance(v, type)}
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if id(x) in seen or isinstance(x, (str, bytes, int, float, complex, type(None))):
            continue
        seen.add(id(x))
        if callable(x):
            raise UnsafeCheckpointError(f"the file holds a callable ({getattr(x, '__module__', '?')}."
                                        f"{getattr(x, '__qualname__', type(x).__name__)}) among its data; "
                                        f"a checkpoint holds none; refused, it was not called")
        if isinstance(x, torch.Tensor):
            if x._backward_hooks or getattr(x, "_post_accumulate_grad_hooks", None):
                raise UnsafeCheckpointError("the file holds a tensor with hooks attached; a checkpoint "
                                            "holds none; refused, they were not called")
            stack.extend(vars(x).values())
            if x.is_leaf and x.grad is not None:
                stack.append(x.grad)
        elif isinstance(x, dict):
            if isinstance(x, collections.defaultdict) and x.default_factory not in _FACTORIES:
                raise UnsafeCheckpointError(f"the file holds a defaultdict whose factory is "
                                            f"{x.default_factory!r}; only dict is accepted; refused")
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif type(x) in allowed_types and hasattr(x, "__dict__"):  # optimiser, scheduler
            stack.extend(vars(x).values())


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load`` on CPU: weights-only when the file allows it, else restricted.

    Raises ``UnsafeCheckpointError`` (a ``ValueError``) naming the file and what it refers
    to when it names anything outside ``ALLOWED_GLOBALS``.
    """
    try:
        result = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            result = torch.load(path, map_location="cpu", weights_only=False,
                                pickle_module=_RestrictedPickle)
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(f"{path}: {exc}") from None
    try:
        _refuse_callables(result)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None
    return result
