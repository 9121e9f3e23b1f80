"""A sweep runs run specs through an executor, skipping runs that are already finished.

A run is finished when its record exists, says ``status: ok`` and carries the spec's
identity (a hash of the resolved config).  A failed run writes a record with
``status: failed`` and the error, and the sweep goes on; it is retried on the next
invocation.  Ctrl-C abandons the current run without writing anything for it; every
record already written stays valid.

The unit of work is ``run_one``: a module-level function of plain data (the spec as a
dict, the output folder, ``RunOptions``) that every executor calls, in this process, in
a worker process, in a Ray task or in a SLURM job, so that all of them write the same
records.  It holds the run's lock (``store.acquire_lock``) while it runs: a run that
another live sweep is running is reported as running elsewhere and left alone, and a run
that another sweep finished meanwhile is skipped.  A run requested twice in one sweep
(the shared transfer training asked for by two protocols) runs once, with the union of
the evaluations.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from benchmark import records, store
from benchmark.protocols import RunSpec

Progress = Callable[[str, int, int, str], None]  # as benchmark.trainer.Progress (stage, done, total, text)

log = logging.getLogger(__name__)


@dataclass
class SweepSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # locked by another live sweep
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (record path, reason): set aside, run again
    seconds: float = 0.0


@dataclass(frozen=True)
class RunOptions:
    """How ``run_one`` runs a spec; plain data, so that it travels to any worker."""

    device: str | None = None
    force: bool = False
    save_checkpoints: bool = False
    plugins: tuple[str, ...] = ()  # modules to import first (methods registered from outside)
    plugin_paths: tuple[str, ...] = ()  # folders those modules are imported from
    sweep_id: str = ""
    stale_lock_s: float = store.STALE_LOCK_S


@dataclass
class SweepState:
    """Live counts of a sweep, for its progress display."""

    total: int = 0  # distinct runs asked for
    todo: int = 0  # runs not finished when the sweep started
    done: int = 0
    failed: int = 0
    skipped: int = 0  # finished before the sweep, or by another sweep meanwhile
    elsewhere: int = 0  # running in another sweep
    running: int = 0
    started_runs: int = 0  # runs seen starting so far
    parallel: int = 1
    settled: int = 0  # runs of todo with an outcome
    durations: list[float] = field(default_factory=list)  # seconds of the runs finished here
    start: float = field(default_factory=time.perf_counter)

    @property
    def remaining(self) -> int:
        return self.todo - self.settled

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float | None:
        """Seconds left: remaining runs at the mean duration of the finished ones, spread
        over the runs that can execute at once; None before the first run finishes."""
        if not self.durations:
            return None
        if not self.remaining:
            return 0.0
        mean = sum(self.durations) / len(self.durations)
        return self.remaining * mean / max(1, min(self.parallel, self.remaining))


def _outcome(spec: RunSpec, status: str, error: str | None = None, seconds: float = 0.0) -> dict:
    import os
    import socket

    return {"id": spec.run_id, "label": spec.label, "status": status, "error": error,
            "seconds": seconds, "host": socket.gethostname(), "pid": os.getpid()}


def _load_plugins(options: RunOptions) -> None:
    for folder in options.plugin_paths:
        if folder not in sys.path:
            sys.path.append(folder)
    from methods.registry import load_plugins

    load_plugins(list(options.plugins))


def run_one(spec: dict, output: str, options: RunOptions, progress: Progress | None = None) -> dict:
    """Run one spec (given as ``spec.to_dict()``) and write its record; returns an outcome:
    ``{"id", "label", "status", "error", "seconds", "host", "pid"}`` with status ``ok``,
    ``failed`` (the record says why), ``skipped`` (another sweep finished it meanwhile) or
    ``elsewhere`` (another live sweep holds its lock).

    A record of the same identity that lacks evaluations (the transfer run asked for more
    targets) is completed from its checkpoint without training; the transfer run always
    writes one, other runs with ``save_checkpoints``."""
    _load_plugins(options)
    from benchmark.protocols import TRANSFER, spec_from_dict
    from benchmark.trainer import execute

    run = spec_from_dict(spec)
    t0 = time.perf_counter()
    try:
        lock = _take_lock(output, run, options)
    except store.LockHeld as held:
        return _outcome(run, "elsewhere", str(held))
    with lock, _run_log(store.log_path(output, run)):
        store.set_aside_damaged(output, run)
        if not options.force and store.is_finished(output, run):
            return _outcome(run, "skipped", "finished by another sweep")
        previous = None if options.force else store.previous_record(output, run)
        log.info("run %s (%s) on %s", run.label, run.run_id, options.device or "auto")
        try:
            record = execute(run, device=options.device, previous=previous,
                             checkpoint=store.checkpoint_path(output, run),
                             save_checkpoint=options.save_checkpoints or run.protocol == TRANSFER, progress=progress,
                             output=output)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken run must not stop the sweep
            log.error("run %s failed: %s", run.label, exc)
            record = records.failed(run, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=20),
                                    getattr(exc, "details", None))
        store.write_json_atomic(store.record_path(output, run), record)
    return _outcome(run, record["status"], record.get("error"), time.perf_counter() - t0)


@contextlib.contextmanager
def _run_log(path: Path):
    """Every log message of the run (epochs, accuracies, warnings) also goes to its own
    file under <output>/logs/, whatever the console shows; appended on a retry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level or logging.WARNING, logging.INFO))  # the console handler keeps its own level
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def unique_specs(specs: Sequence[RunSpec]) -> list[RunSpec]:
    """One spec per run identity, in first-seen order; evaluations of duplicates are merged
    (the transfer run's identity does not include its targets)."""
    merged: dict[str, RunSpec] = {}
    for spec in specs:
        seen = merged.get(spec.run_id)
        if seen is None:
            merged[spec.run_id] = spec
        else:
            extra = tuple(e for e in spec.evals if e not in seen.evals)
            if extra:
                merged[spec.run_id] = replace(seen, evals=seen.evals + extra)
    return list(merged.values())


def plugin_paths(plugins: Sequence[str]) -> tuple[str, ...]:
    """The folders the (already imported) plugin modules come from, so that worker
    processes on any machine sharing the file system import them the same way."""
    folders = []
    for name in plugins:
        top = sys.modules.get(name.split(".")[0])
        if top is None:
            continue
        if getattr(top, "__path__", None):
            folder = Path(list(top.__path__)[0]).resolve().parent
        elif getattr(top, "__file__", None):
            folder = Path(top.__file__).resolve().parent
        else:
            continue
        if str(folder) not in folders:
            folders.append(str(folder))
    return tuple(folders)


# a killed attempt's sockets close before the kernel marks its process gone, so its
# executor can report it (and start the next attempt) while its lock still looks held
KILLED_ATTEMPT_EXIT_S = 10.0


def _take_lock(output: str | Path, spec: RunSpec, options: RunOptions) -> store.RunLock:
    """The run's lock; a lock of this same sweep (an earlier attempt of the run, killed and
    still exiting) is waited for, up to ``KILLED_ATTEMPT_EXIT_S``; another sweep's lock
    raises ``LockHeld`` at once."""
    deadline = time.monotonic() + KILLED_ATTEMPT_EXIT_S
    while True:
        try:
            return store.acquire_lock(store.lock_path(output, spec), sweep=options.sweep_id,
                                      stale_after=options.stale_lock_s)
        except store.LockHeld as held:
            if not options.sweep_id or held.holder.get("sweep") != options.sweep_id or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _record_lost(output: str | Path, spec: RunSpec, error: str, options: RunOptions) -> None:
    """Write the failure record of a run whose worker never reported back, unless another
    sweep runs it now or a successful record exists."""
    try:
        lock = _take_lock(output, spec, options)
    except store.LockHeld:
        return
    with lock:
        store.set_aside_damaged(output, spec)
        if store.previous_record(output, spec) is None:
            store.write_json_atomic(store.record_path(output, spec), records.failed(spec, error))


class _Tracker:
    """Learns which runs of this sweep are running from their lock files (any executor)."""

    def __init__(self, output: str | Path, specs: Sequence[RunSpec], options: RunOptions,
                 state: SweepState, emit: Callable[[str, RunSpec | None], None]):
        self.output, self.options, self.state, self.emit = output, options, state, emit
        self.waiting = {spec.run_id: spec for spec in specs}  # not seen running
        self.running: dict[str, RunSpec] = {}
        self.last_poll = 0.0

    def started(self, spec: RunSpec) -> None:
        if self.waiting.pop(spec.run_id, None) is not None:
            self.running[spec.run_id] = spec
            self.state.running = len(self.running)
            self.state.started_runs += 1
            self.emit("start", spec)

    def ended(self, spec: RunSpec) -> bool:
        """Forget the run; True when it was never seen starting."""
        unseen = self.waiting.pop(spec.run_id, None) is not None
        self.running.pop(spec.run_id, None)
        self.state.running = len(self.running)
        if unseen:
            self.state.started_runs += 1
        return unseen

    def poll(self) -> None:
        now = time.monotonic()
        if now - self.last_poll < 1.0:
            return
        self.last_poll = now
        for spec in list(self.waiting.values()):
            path = store.lock_path(self.output, spec)
            if path.exists():
                holder = store.lock_holder(path)
                if holder is not None and holder.get("sweep") == self.options.sweep_id:
                    self.started(spec)
        self.emit("tick", None)


def run_sweep(specs: Sequence[RunSpec], output: str | Path, *, executor=None, device=None,
              force: bool = False, save_checkpoints: bool = False,
              progress: Callable[[str, RunSpec | None, SweepState], None] | None = None,
              plugins: Sequence[str] = (), stale_lock_s: float = store.STALE_LOCK_S,
              run_progress: Progress | None = None) -> SweepSummary:
    """Run what is not finished, through ``executor`` (default: in this process).

    ``progress(event, spec, state)`` hears ``start``, ``ok``, ``failed``, ``skipped``
    (finished by another sweep meanwhile), ``elsewhere`` (locked by another live sweep),
    and ``tick`` (spec None) about once a second while an executor waits.  ``plugins``:
    modules worker processes import first (``--plugin``).  ``run_progress`` hears the
    steps and evaluated images of the run in progress when runs execute in this process."""
    from benchmark.executors import LocalExecutor

    own_executor = executor is None
    executor = executor or LocalExecutor()
    specs = unique_specs(specs)
    summary = SweepSummary()
    todo = []
    for spec in specs:
        if not force and store.is_finished(output, spec):
            summary.skipped.append(spec.label)
        else:
            todo.append(spec)
            damaged = store.damaged_record(output, spec)
            if damaged is not None:
                summary.damaged.append((str(damaged.path), damaged.reason))
                log.warning("the record %s is damaged (%s): it goes to %s and %s runs again", damaged.path,
                            damaged.reason, store.quarantine_path(output, damaged.path).parent, spec.label)
    if summary.skipped:
        log.info("%d of %d runs already finished; skipping them", len(summary.skipped), len(specs))

    options = RunOptions(device=device, force=force, save_checkpoints=save_checkpoints,
                         plugins=tuple(plugins), plugin_paths=plugin_paths(plugins),
                         sweep_id=uuid.uuid4().hex, stale_lock_s=stale_lock_s)
    state = SweepState(total=len(specs), todo=len(todo), skipped=len(summary.skipped),
                       parallel=max(1, int(getattr(executor, "parallelism", 1))))

    def emit(event: str, spec: RunSpec | None) -> None:
        if progress:
            progress(event, spec, state)

    tracker = _Tracker(output, todo, options, state, emit)
    by_id = {spec.run_id: spec for spec in todo}
    fn = functools.partial(run_one, output=str(output), options=options,
                           progress=run_progress if executor.in_process else None)
    if executor.in_process:
        def work(item: dict) -> dict:
            tracker.started(by_id[_item_id(item)])
            return fn(item)
    else:
        work = fn
    emit("tick", None)
    results = executor.map(work, [spec.to_dict() for spec in todo], tick=tracker.poll)
    try:
        for item, outcome in results:
            spec = by_id[outcome.get("id") or _item_id(item)]
            _settle(spec, outcome, summary, state, tracker, emit, output, options)
    finally:
        results.close()  # an interrupted executor cancels what it still runs
        if tracker.running or tracker.waiting:
            for spec in [*tracker.running.values(), *tracker.waiting.values()]:
                store.remove_own_lock(store.lock_path(output, spec), options.sweep_id)
        if own_executor:
            executor.close()
    summary.seconds = state.elapsed
    return summary


def _item_id(item: dict) -> str:
    from benchmark.protocols import spec_from_dict

    return spec_from_dict(item).run_id


def _settle(spec: RunSpec, outcome: dict, summary: SweepSummary, state: SweepState, tracker: _Tracker,
            emit: Callable, output: str | Path, options: RunOptions) -> None:
    status = outcome["status"]
    if status == "lost":
        log.error("run %s failed: %s", spec.label, outcome["error"])
        _record_lost(output, spec, outcome["error"], options)
        status = "failed"
    if tracker.ended(spec) and status in ("ok", "failed"):
        emit("start", spec)  # a run too short to be seen running still gets its line
    state.settled += 1
    if status == "ok":
        summary.done.append(spec.label)
        state.done += 1
        state.durations.append(float(outcome.get("seconds") or 0.0))
    elif status == "failed":
        summary.failed.append((spec.label, outcome.get("error") or "unknown error"))
        state.failed += 1
        if outcome.get("seconds"):
            state.durations.append(float(outcome["seconds"]))
    elif status == "skipped":
        summary.skipped.append(spec.label)
        state.skipped += 1
    else:
        summary.elsewhere.append((spec.label, outcome.get("error") or "running in another sweep"))
        state.elsewhere += 1
    emit(status, spec)


# -- the dry run's estimate ---------------------------------------------------------------------
@dataclass
class PlannedRun:
    label: str
    state: str  # "done", "partial" (evaluations missing) or "to do"
    steps: int  # optimiser steps of its training
    images: int  # test images of its missing evaluations


@dataclass
class Plan:
    """What a sweep would do: each run's state and work, and the totals."""

    rows: list[PlannedRun] = field(default_factory=list)
    steps_left: int = 0
    images_left: int = 0
    seconds_left: float = 0.0  # training time at the speed of the finished runs (median per method)
    unknown: set[str] = field(default_factory=set)  # methods with no finished run to time

    @property
    def counts(self) -> dict[str, int]:
        return {state: sum(r.state == state for r in self.rows) for state in ("done", "partial", "to do")}

    @property
    def minutes_left(self) -> int:
        return math.ceil(self.seconds_left / 60) if self.seconds_left else 0


def estimate(specs: Sequence[RunSpec], output: str | Path) -> Plan:
    """Each run's state under ``output`` and the work left: training steps from the run's
    epochs, batch size and class count, test images of the missing evaluations, and time
    at the median seconds per step of the method's finished runs."""
    import statistics

    from datasets.build import build_dataset

    sizes: dict[tuple, tuple[int, int]] = {}

    def size(dataset: str, subsample: str, root: str) -> tuple[int, int]:  # (classes, test images)
        key = (dataset, subsample, root)
        if key not in sizes:
            splits = build_dataset(dataset, root, num_shots=0, subsample=subsample)
            sizes[key] = (len(splits.classnames), len(splits.test))
        return sizes[key]

    per_step: dict[str, list[float]] = {}
    for record in store.iter_records(output):
        seconds = records.seconds_per_step(record)
        if seconds is not None:
            per_step.setdefault(record["method"], []).append(seconds)
    plan = Plan()
    for spec in specs:
        previous = store.previous_record(output, spec)
        missing = spec.evals if previous is None else records.missing_evals(previous, spec)
        state = "done" if previous is not None and not missing else "partial" if previous is not None else "to do"
        root = spec.config["DATASET"]["ROOT"]
        n_classes, _ = size(spec.dataset, spec.subsample, root)
        epochs = int(spec.config["OPTIM"]["MAX_EPOCH"])
        batch = int(spec.config["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"])
        steps = max(1, (spec.shots * n_classes) // batch) * epochs if epochs > 0 else 0
        images = sum(size(e.dataset, e.subsample, root)[1] for e in missing)
        if state == "to do":
            plan.steps_left += steps
            if steps and spec.method in per_step:
                plan.seconds_left += steps * statistics.median_high(per_step[spec.method])
            elif steps:
                plan.unknown.add(spec.method)
        if state != "done":
            plan.images_left += images
        plan.rows.append(PlannedRun(spec.label, state, steps, images))
    return plan
