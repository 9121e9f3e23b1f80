"""The record schema: what a run leaves on disk, built and checked in one place.

A record is a JSON object, one per run (``benchmark.store`` writes and finds them).
There are two kinds, told apart by ``status``:

- ``FinishedRecord`` (``"ok"``): the run's identity, resolved config, one entry per
  evaluation in ``metrics`` (an ``Evaluation``: accuracy, macro-F1, images; or a
  ``NotApplicable`` with the reason), what training did (``TrainInfo``), the compute it
  used, timings, software versions and the code revision;
- ``FailedRecord`` (``"failed"``): the identity, the error, its traceback and the
  details a run gave (what failed, where).

``finished`` and ``failed`` build them; ``validate`` checks a record read from disk and
says what is wrong with one that does not fit (a record edited or cut by hand), so that
a damaged record is reported and set aside instead of stopping a sweep or a table.
Records written before ``SCHEMA_VERSION`` existed (version 1) have the same fields and
load as they are.  Readers use the accessors below (``applicable_metrics``,
``missing_evals``, ``seconds_per_step``) rather than the keys.
"""

from __future__ import annotations

import math
import time
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
    timings: dict  # train_s, total_s, started, finished
    config: dict
    effective_input_size: list[int]
    software: dict
    code_revision: str
    checkpoint: str
    resumed_from_checkpoint: bool


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


Record = Union[FinishedRecord, FailedRecord]


# -- building ---------------------------------------------------------------------------------
def _identity(spec) -> dict:
    return {"id": spec.run_id, "method": spec.method, "protocol": spec.protocol, "stage": spec.stage,
            "dataset": spec.dataset, "shots": spec.shots, "seed": spec.seed, "backbone": spec.backbone}


def finished(spec, *, method_version: int, world: str, evals: Sequence[dict], metrics: dict,
             train: TrainInfo, compute: dict, timings: dict, effective_input_size: Sequence[int],
             software: dict, code_revision: str, checkpoint: str | None = None,
             resumed_from_checkpoint: bool = False) -> FinishedRecord:
    """The record of a run that ended normally (``spec``: a ``protocols.RunSpec``)."""
    record: FinishedRecord = {
        "schema_version": SCHEMA_VERSION, **_identity(spec), "status": "ok", "method_version": method_version,
        "subsample": spec.subsample, "backbone_id": spec.backbone_id, "world": world,
        "evals": [dict(e) for e in evals], "metrics": dict(metrics), "train": train, "compute": compute,
        "timings": timings, "config": spec.config, "effective_input_size": list(effective_input_size),
        "software": software, "code_revision": code_revision,
    }
    if checkpoint is not None:
        record["checkpoint"] = str(checkpoint)
    if resumed_from_checkpoint:
        record["resumed_from_checkpoint"] = True
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
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecordError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value is None


def _check_evaluation(name: str, value: Any) -> None:
    where = f"metrics[{name!r}]"
    _check(isinstance(value, dict), f"{where} must be an object, not {type(value).__name__} ({value!r:.60})")
    if value.get("status") == "not_applicable":
        _check(isinstance(value.get("reason"), str), f"{where} is not applicable but gives no reason")
        return
    _check("accuracy" in value, f"{where} has no accuracy")
    for key in ("accuracy", "macro_f1", "seconds"):
        _check(_is_number(value.get(key)), f"{where}.{key} must be a number, not {value.get(key)!r:.40}")
    for key in ("n_images", "n_correct", "n_classes"):
        _check(key not in value or _is_int(value[key]), f"{where}.{key} must be an integer, not {value[key]!r:.40}")
    accuracy = value["accuracy"]
    _check(accuracy is None or math.isnan(accuracy) or 0.0 <= accuracy <= 100.0,
           f"{where}.accuracy is {accuracy}, outside 0..100")


def validate(data: Any) -> Record:
    """``data`` as a record, or ``RecordError`` saying what does not fit the schema."""
    _check(isinstance(data, dict), f"a record is a JSON object, not {type(data).__name__}")
    version = data.get("schema_version", 1)
    _check(_is_int(version) and 1 <= version <= SCHEMA_VERSION,
           f"schema_version {version!r} is not one this harness reads (1 to {SCHEMA_VERSION}); "
           "a newer harness wrote it")
    status = data.get("status")
    _check(status in STATUSES, f"status is {status!r}, not one of {', '.join(STATUSES)}")
    for key in ("id", "method", "protocol", "dataset"):
        _check(isinstance(data.get(key), str) and data[key] != "", f"{key} must be a non-empty string, "
                                                                     f"not {data.get(key)!r:.40}")
    for key in ("shots", "seed"):
        _check(_is_int(data.get(key)), f"{key} must be an integer, not {data.get(key)!r:.40}")
    _check(isinstance(data.get("config", {}), dict), "config must be an object")
    if status == "failed":
        _check(isinstance(data.get("error", ""), str), "error must be a string")
        _check(isinstance(data.get("details", {}), dict), "details must be an object")
        return data  # type: ignore[return-value]
    metrics = data.get("metrics")
    _check(isinstance(metrics, dict), f"metrics must be an object of evaluations, not {metrics!r:.40}")
    for name, value in metrics.items():
        _check_evaluation(name, value)
    evals = data.get("evals", [])
    _check(isinstance(evals, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                           and isinstance(e.get("dataset"), str) for e in evals),
           "evals must be a list of {name, dataset, subsample} objects")
    for key in ("train", "compute", "timings"):
        _check(isinstance(data.get(key, {}), dict), f"{key} must be an object, not {data.get(key)!r:.40}")
    train = data.get("train", {})
    _check("steps" not in train or _is_int(train["steps"]), "train.steps must be an integer")
    timings = data.get("timings", {})
    _check(_is_number(timings.get("train_s", 0.0)), "timings.train_s must be a number")
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
