"""Where a run's time goes: seconds per stage, measured with ``time.perf_counter``.

Every finished record carries ``timings.stages``, one number per stage of ``STAGES``:

- ``imports``: seconds this process spent importing the harness and its libraries (torch,
  torchvision, open_clip, rich, the methods), measured once per process: in ``run.py``
  around its import of the command line, and in ``benchmark/trainer.py`` around the
  trainer's own imports (what was not loaded yet); charged to the first run the process
  executes (0 in later runs), so that the stages of a sweep's records add up to its time;
- ``datasets``: building the run's splits (split files, the few-shot draw, base/new);
- ``model``: the backbone copy and the method built around it (``prepare_model``);
- ``data_loading``: training waiting for its batches (decoding, augmenting, collating;
  with loader workers, only the time the training loop waited);
- ``training``: training steps, the rest of training (forward, loss, backward, optimiser;
  a method's own ``fit`` entirely);
- ``evaluation``: every evaluation of the run (telling the method its classes, its data,
  the forward passes, the metrics);
- ``writing``: the checkpoint, the per-image predictions and the record's provenance
  (library versions, code revision);
- ``other``: the rest of the run's ``total_s`` (seeding, bookkeeping).

All but ``imports`` lie inside the run's ``timings.total_s`` and add up to it.  Records
written before the breakdown existed have no ``stages``; readers use ``stages_of``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator

STAGES = ("imports", "datasets", "model", "data_loading", "training", "evaluation", "writing", "other")
TITLES = {"imports": "imports", "datasets": "building datasets", "model": "building the model",
          "data_loading": "data loading (waiting for batches)", "training": "training steps (compute)",
          "evaluation": "evaluation", "writing": "writing", "other": "other"}

_imports_s = 0.0  # seconds of the outermost import spans of this process
_depth = 0
_span_start = 0.0
_imports_charged = False


def import_begin() -> None:
    """Start an import span (nested spans count once, as the outermost one)."""
    global _depth, _span_start
    if _depth == 0:
        _span_start = time.perf_counter()
    _depth += 1


def import_end() -> None:
    global _depth, _imports_s
    _depth = max(0, _depth - 1)
    if _depth == 0:
        _imports_s += time.perf_counter() - _span_start


def imports_seconds() -> float:
    """Seconds this process has spent in import spans so far."""
    return _imports_s


def take_imports() -> float:
    """The process's import seconds the first time a run asks, 0.0 afterwards."""
    global _imports_charged
    if _imports_charged:
        return 0.0
    _imports_charged = True
    return float(_imports_s)


class StageTimer:
    """Seconds per stage of one run: ``with timer("datasets"): ...`` adds to a stage,
    ``timer.batches(loader)`` charges the waits for a loader's batches to ``data_loading``."""

    def __init__(self) -> None:
        self.seconds = {name: 0.0 for name in STAGES}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if stage not in self.seconds:
            raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def batches(self, loader: Iterable, stage: str = "data_loading") -> Iterator:
        """The items of ``loader``, the time spent waiting for each charged to ``stage``."""
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.seconds[stage] += time.perf_counter() - start
                return
            self.seconds[stage] += time.perf_counter() - start
            yield item

    def finish(self, total_s: float, imports_s: float = 0.0) -> dict[str, float]:
        """The breakdown for the record: ``other`` is what ``total_s`` holds beyond the
        measured stages; ``imports`` lies outside ``total_s``."""
        out = dict(self.seconds)
        out["imports"] = float(imports_s)
        measured = sum(v for k, v in out.items() if k not in ("imports", "other"))
        out["other"] = max(0.0, float(total_s) - measured)
        return {k: round(v, 6) for k, v in out.items()}


def stages_of(record: dict) -> dict[str, float] | None:
    """A finished record's stage breakdown, or None (a record made before it existed)."""
    stages = record.get("timings", {}).get("stages") if isinstance(record, dict) else None
    return dict(stages) if isinstance(stages, dict) else None


def total(records: Iterable[dict]) -> dict[str, float]:
    """Seconds per stage summed over the records that have a breakdown."""
    out = {name: 0.0 for name in STAGES}
    for record in records:
        for name, value in (stages_of(record) or {}).items():
            if name in out and isinstance(value, (int, float)):
                out[name] += float(value)
    return out


def table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per stage, one column per breakdown (seconds and share)."""
    names = list(columns)
    lines = ["| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    sums = {n: sum(columns[n].get(s, 0.0) for s in STAGES) for n in names}
    for stage in STAGES:
        cells = []
        for n in names:
            value = columns[n].get(stage, 0.0)
            share = 100 * value / sums[n] if sums[n] else 0.0
            cells.append(f"{value:.2f} s ({share:.0f}%)")
        lines.append(f"| {TITLES[stage]} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"{sums[n]:.2f} s" for n in names) + " |")
    return "\n".join(lines)
