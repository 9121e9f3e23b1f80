"""The record schema: what a run leaves on disk, built and checked in one place.

A record is a JSON object, one per run (``benchmark.store`` writes and finds them).
There are two kinds, told apart by ``status``:

- ``FinishedRecord`` (``"ok"``): the run's identity, resolved config, one entry per
  evaluation in ``metrics`` (an ``Evaluation``: accuracy, macro-F1, images; or a
  ``NotApplicable`` with the reason), what training did (``TrainInfo``), the compute it
  used, timings, software versions and the code revision, and where its per-image
  predictions are (``predictions``, ``benchmark.predictions``);
- ``FailedRecord`` (``"failed"``): the identity, the error, its traceback and the
  details a run gave (what failed, where).

``finished`` and ``failed`` build them; ``validate`` checks a record read from disk and
says what is wrong with one that does not fit (a record edited or cut by hand), so that
a damaged record is reported and set aside instead of stopping a sweep or a table.
Records written before ``SCHEMA_VERSION`` existed (version 1) have the same fields and
load as they are.  A run of a ``--grid`` sweep also holds its grid point (``grid``: config
key -> value) and whether that point is the run without the grid (``grid_plain``); both
are optional, and so are ``predictions`` and ``timings.stages`` (seconds per stage of the run,
``benchmark.stages``): records made before them load unchanged.  Readers use the accessors below (``applicable_metrics``,
``missing_evals``, ``seconds_per_step``) rather than the keys.
"""

from __future__ import annotations

import functools
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, TypedDict, Union

SCHEMA_VERSION = 2
STATUSES = ("ok", "failed")


class RecordError(ValueError):
    """A record that does not fit the schema; the message says which field and why."""


class Evaluation(TypedDict, total=False):
    accuracy: float  # percent
    macro_f1: float  # percent, macro over the classes present in the test set
    n_images: int
    n_correct: int
    n_classes: int
    seconds: float


class NotApplicable(TypedDict):
    status: Literal["not_applicable"]
    reason: str
    n_classes: int


class TrainInfo(TypedDict, total=False):
    n_images: int
    n_classes: int
    classes_short_of_shots: dict[str, int]  # class -> training images (fewer than the shots)
    classes_without_training_images: dict[str, int]  # class -> test images left out with it
    steps: int
    epoch_losses: list[float]
    learning_rates: list[float]
    fit: dict | None  # what a method's own ``fit`` reports


class EvalEntry(TypedDict):
    name: str
    dataset: str
    subsample: str


class FinishedRecord(TypedDict, total=False):
    schema_version: int
    id: str
    status: Literal["ok"]
    method: str
    method_version: int
    protocol: str
    stage: str
    dataset: str
    shots: int
    seed: int
    subsample: str
    backbone: str
    backbone_id: str
    world: str  # "real", "toy" or "synthetic"
    evals: list[EvalEntry]
    metrics: dict[str, Union[Evaluation, NotApplicable]]
    train: TrainInfo
    compute: dict
    timings: dict  # train_s, total_s, started, finished; stages (optional): stage -> seconds
    config: dict
    effective_input_size: list[int]
    software: dict
    environment: dict  # what made the numbers besides the config (``environment``); optional
    learned: dict  # the learned tensors' summaries (``checkpoint.summary``); optional
    code_revision: str
    checkpoint: str
    resumed_from_checkpoint: bool
    predictions: str  # per-image predictions file, relative to the output folder
    grid: dict  # --grid sweeps: the run's grid point, config key -> value
    grid_plain: bool  # the grid point is the run the same command gives without --grid


class FailedRecord(TypedDict, total=False):
    schema_version: int
    id: str
    status: Literal["failed"]
    method: str
    protocol: str
    stage: str
    dataset: str
    shots: int
    seed: int
    backbone: str
    error: str
    traceback: str
    details: dict  # e.g. {"kind": "out_of_memory", "stage": "training", ...}
    config: dict
    finished: float
    grid: dict
    grid_plain: bool


Record = Union[FinishedRecord, FailedRecord]


# -- building ---------------------------------------------------------------------------------
def _identity(spec) -> dict:
    identity = {"id": spec.run_id, "method": spec.method, "protocol": spec.protocol, "stage": spec.stage,
                "dataset": spec.dataset, "shots": spec.shots, "seed": spec.seed, "backbone": spec.backbone}
    if getattr(spec, "grid", None):
        identity.update(grid=dict(spec.grid), grid_plain=bool(spec.grid_plain))
    return identity


def finished(spec, *, method_version: int, world: str, evals: Sequence[dict], metrics: dict,
             train: TrainInfo, compute: dict, timings: dict, effective_input_size: Sequence[int],
             software: dict, code_revision: str, checkpoint: str | None = None,
             resumed_from_checkpoint: bool = False, predictions: str | None = None,
             environment: dict | None = None, learned: dict | None = None) -> FinishedRecord:
    """The record of a run that ended normally (``spec``: a ``protocols.RunSpec``)."""
    record: FinishedRecord = {
        "schema_version": SCHEMA_VERSION, **_identity(spec), "status": "ok", "method_version": method_version,
        "subsample": spec.subsample, "backbone_id": spec.backbone_id, "world": world,
        "evals": [dict(e) for e in evals], "metrics": dict(metrics), "train": train, "compute": compute,
        "timings": timings, "config": spec.config, "effective_input_size": list(effective_input_size),
        "software": software, "code_revision": code_revision,
    }
    if environment is not None:
        record["environment"] = dict(environment)
    if learned is not None:
        record["learned"] = dict(learned)
    if checkpoint is not None:
        record["checkpoint"] = str(checkpoint)
    if resumed_from_checkpoint:
        record["resumed_from_checkpoint"] = True
    if predictions is not None:
        record["predictions"] = str(predictions)
    return validate(record)


def failed(spec, error: str, trace: str = "", details: dict | None = None) -> FailedRecord:
    """The record of a run that could not finish (``details``: what failed, where)."""
    record: FailedRecord = {"schema_version": SCHEMA_VERSION, **_identity(spec), "status": "failed",
                            "error": error, "traceback": trace, "config": spec.config, "finished": time.time()}
    if details:
        record["details"] = details
    return record


def not_applicable(reason: str, n_classes: int) -> NotApplicable:
    return {"status": "not_applicable", "reason": reason, "n_classes": n_classes}


# -- checking ---------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value is None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_evaluation(name: str, value: Any) -> None:
    where = f"metrics[{name!r}]"
    if not isinstance(value, dict):
        raise RecordError(f"{where} must be an object, not {type(value).__name__} ({_shown(value)})")
    if value.get("status") == "not_applicable":
        if not isinstance(value.get("reason"), str):
            raise RecordError(f"{where} is not applicable but gives no reason")
        return
    if "accuracy" not in value:
        raise RecordError(f"{where} has no accuracy")
    for key in ("accuracy", "macro_f1", "seconds"):
        if not _is_number(value.get(key)):
            raise RecordError(f"{where}.{key} must be a number, not {_shown(value.get(key))}")
    for key in ("n_images", "n_correct", "n_classes"):
        if key in value and not _is_int(value[key]):
            raise RecordError(f"{where}.{key} must be an integer, not {_shown(value[key])}")
    accuracy = value["accuracy"]
    if accuracy is not None and not math.isnan(accuracy) and not 0.0 <= accuracy <= 100.0:
        raise RecordError(f"{where}.accuracy is {accuracy}, outside 0..100")


def validate(data: Any) -> Record:
    """``data`` as a record, or ``RecordError`` saying what does not fit the schema."""
    if not isinstance(data, dict):
        raise RecordError(f"a record is a JSON object, not {type(data).__name__}")
    version = data.get("schema_version", 1)
    if not (_is_int(version) and 1 <= version <= SCHEMA_VERSION):
        raise RecordError(f"schema_version {_shown(version)} is not one this harness reads (1 to {SCHEMA_VERSION}); "
                          "a newer harness wrote it")
    status = data.get("status")
    if status not in STATUSES:
        raise RecordError(f"status is {_shown(status)}, not one of {', '.join(STATUSES)}")
    for key in ("id", "method", "protocol", "dataset"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RecordError(f"{key} must be a non-empty string, not {_shown(data.get(key))}")
    for key in ("shots", "seed"):
        if not _is_int(data.get(key)):
            raise RecordError(f"{key} must be an integer, not {_shown(data.get(key))}")
    if not isinstance(data.get("config", {}), dict):
        raise RecordError("config must be an object")
    grid = data.get("grid", {})
    if not (isinstance(grid, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                           for k, v in grid.items())):
        raise RecordError(f"grid must be an object of config keys and plain values, not {_shown(grid)}")
    if not isinstance(data.get("grid_plain", False), bool):
        raise RecordError(f"grid_plain must be true or false, not {_shown(data.get('grid_plain'))}")
    if status == "failed":
        if not isinstance(data.get("error", ""), str):
            raise RecordError("error must be a string")
        if not isinstance(data.get("details", {}), dict):
            raise RecordError("details must be an object")
        return data  # type: ignore[return-value]
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise RecordError(f"metrics must be an object of evaluations, not {_shown(metrics)}")
    for name, value in metrics.items():
        _check_evaluation(name, value)
    evals = data.get("evals", [])
    if not (isinstance(evals, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                            and isinstance(e.get("dataset"), str) for e in evals)):
        raise RecordError("evals must be a list of {name, dataset, subsample} objects")
    for key in ("train", "compute", "timings", "environment", "learned"):
        if not isinstance(data.get(key, {}), dict):
            raise RecordError(f"{key} must be an object, not {_shown(data.get(key))}")
    if "steps" in data.get("train", {}) and not _is_int(data["train"]["steps"]):
        raise RecordError("train.steps must be an integer")
    if not _is_number(data.get("timings", {}).get("train_s", 0.0)):
        raise RecordError("timings.train_s must be a number")
    stages = data.get("timings", {}).get("stages", {})
    if not (isinstance(stages, dict) and all(isinstance(k, str) and _is_number(v) and v is not None
                                             for k, v in stages.items())):
        raise RecordError(f"timings.stages must be an object of stage names and seconds, not {_shown(stages)}")
    if "predictions" in data and not (isinstance(data["predictions"], str) and data["predictions"]):
        raise RecordError(f"predictions must name a file, not {_shown(data['predictions'])}")
    return data  # type: ignore[return-value]


# -- reading ----------------------------------------------------------------------------------
def is_finished_record(record: Record) -> bool:
    return record.get("status") == "ok"


def applicable_metrics(record: Record) -> Iterator[tuple[str, Evaluation]]:
    """(evaluation name, its metrics) of every evaluation with an accuracy."""
    if not is_finished_record(record):
        return
    for name, value in record["metrics"].items():
        if value.get("status") != "not_applicable" and value.get("accuracy") is not None:
            yield name, value  # type: ignore[misc]


def missing_evals(record: Record, spec) -> list:
    """The evaluations of ``spec`` (``EvalSpec``s) that the record lacks."""
    done = record.get("metrics", {}) if is_finished_record(record) else {}
    return [e for e in spec.evals if e.name not in done]


def seconds_per_step(record: Record) -> float | None:
    """Training seconds per optimiser step of a finished run that trained, else None."""
    if not is_finished_record(record):
        return None
    steps = record.get("train", {}).get("steps")
    return record["timings"]["train_s"] / steps if steps else None


def merge_evals(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """Evaluation entries of a resumed record: the earlier ones, then the new ones."""
    names = {e["name"] for e in new}
    return [e for e in old if e["name"] not in names] + list(new)


def in_plain_tables(record: Record) -> bool:
    """Whether a record belongs in the ordinary tables: every run except the grid points of a
    ``--grid`` sweep that differ from the run without the grid (those go to the ablation tables)."""
    return not record.get("grid") or bool(record.get("grid_plain"))


# -- provenance -------------------------------------------------------------------------------
def software_versions() -> dict:
    import numpy as np
    import open_clip
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__}


def environment(device, loader_workers: int) -> dict:
    """What made a run's numbers besides its config and code: the library builds, the device,
    the CPU kernels torch chose (``cpu_capability``: DEFAULT, AVX2, AVX512, ...), the threads
    of this process and the loader workers the run used.  Two records of one identity made in
    different environments may differ by rounding (``python run.py verify`` shows by how much)."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name(device) if cuda else device.type,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "loader_workers": int(loader_workers),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    """The CPU's model name where the system says it (Linux), else its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def code_revision() -> str:
    """The git revision of the harness (``+dirty`` with uncommitted changes to tracked files),
    read once per process: the code a process runs is the code it imported."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
