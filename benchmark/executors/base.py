"""What every executor offers the sweep.

An executor maps a picklable function of one argument (``benchmark.sweep.run_one`` bound
to the output folder and the run options) over run specs given as plain dicts, wherever
it runs them, and yields ``(item, outcome)`` pairs as runs end, in any order.  The
function writes the run's record itself; the outcome is a small dict (status, error,
seconds).  When the executor cannot get an outcome (the worker, task or job died more
often than ``max_retries`` allows, or an error escaped the function), it yields
``lost(message)`` instead and the sweep records the failure: a run is never dropped
silently.

While it waits, an executor calls ``tick()`` about once per ``TICK_S`` seconds so that
the sweep can refresh its progress (it learns which runs started from their lock files).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

TICK_S = 1.0


def import_optional(module: str, hint: str):
    """Import an optional engine (Ray, submitit), or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExecutorUnavailable(f"{hint} ({exc})") from None


class ExecutorUnavailable(RuntimeError):
    """The executor's optional package (Ray, submitit) is not installed; the message says how
    to install it (it holds brackets, ``.[ray]``: print it without markup)."""


def lost(error: str) -> dict:
    """The outcome of a run whose worker never reported back."""
    return {"status": "lost", "error": error}


def signal_text(exitcode: int | None) -> str:
    """'exit code 3' or 'killed by SIGKILL' for a process exit code."""
    import signal

    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class Executor:
    name = "base"
    in_process = False  # runs call the function in this process (the sweep then knows when each starts)
    parallelism = 1  # how many runs may execute at once (for the time estimate)

    def map(self, fn: Callable[[Any], dict], items: Iterable[Any], *,
            tick: Callable[[], None] | None = None) -> Iterator[tuple[Any, dict]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started (worker processes, a local Ray instance)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
