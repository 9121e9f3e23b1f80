"""A sweep runs run specs through an executor, skipping runs that are already finished.

A run is finished when its record exists, says ``status: ok`` and carries the spec's
identity (a hash of the resolved config).  A failed run writes a record with
``status: failed`` and the error, and the sweep goes on; it is retried on the next
invocation.  Ctrl-C abandons the current run without writing anything for it; every
record already written stays valid.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from benchmark import store
from benchmark.protocols import RunSpec

log = logging.getLogger(__name__)


@dataclass
class SweepSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _failure_record(spec: RunSpec, exc: BaseException) -> dict:
    return {
        "id": spec.run_id, "status": "failed", "method": spec.method, "protocol": spec.protocol,
        "stage": spec.stage, "dataset": spec.dataset, "shots": spec.shots, "seed": spec.seed,
        "backbone": spec.backbone, "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(limit=20), "config": spec.config,
        "finished": time.time(),
    }


def run_sweep(specs: Sequence[RunSpec], output: str | Path, *, executor=None, device=None,
              force: bool = False, save_checkpoints: bool = False,
              progress: Callable[[str, RunSpec, int, int], None] | None = None) -> SweepSummary:
    """Run what is not finished.  A record of the same identity that lacks evaluations (the
    transfer run asked for more targets) is completed from its checkpoint without training;
    the transfer run always writes one, other runs with ``save_checkpoints``."""
    from benchmark.protocols import TRANSFER

    from benchmark.executors import LocalExecutor
    from benchmark.trainer import execute

    executor = executor or LocalExecutor()
    summary = SweepSummary()
    start = time.perf_counter()
    todo = []
    for spec in specs:
        if not force and store.is_finished(output, spec):
            summary.skipped.append(spec.label)
        else:
            todo.append(spec)
    if summary.skipped:
        log.info("%d of %d runs already finished; skipping them", len(summary.skipped), len(specs))

    def work(spec: RunSpec) -> dict:
        index = len(summary.done) + len(summary.failed) + 1
        if progress:
            progress("start", spec, index, len(todo))
        previous = None if force else store.previous_record(output, spec)
        try:
            record = execute(spec, device=device, previous=previous,
                             checkpoint=store.checkpoint_path(output, spec),
                             save_checkpoint=save_checkpoints or spec.protocol == TRANSFER)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken run must not stop the sweep
            log.error("run %s failed: %s", spec.label, exc)
            record = _failure_record(spec, exc)
        store.write_json_atomic(store.record_path(output, spec), record)
        return record

    for spec, record in executor.map(work, todo):
        if record["status"] == "ok":
            summary.done.append(spec.label)
        else:
            summary.failed.append((spec.label, record["error"]))
        if progress:
            progress(record["status"], spec, len(summary.done) + len(summary.failed), len(todo))
    summary.seconds = time.perf_counter() - start
    return summary
