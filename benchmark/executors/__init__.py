"""Where a run executes.

``local``: this machine; in this process one run after another, or worker processes (one
per GPU, or N on the CPU).  ``ray``: Ray tasks on a local Ray instance or a cluster.
``slurm``: SLURM jobs through submitit.  Ray and submitit are optional extras
(``pip install -e ".[ray]"``, ``".[slurm]"``) imported only when asked for.  Every
executor runs ``benchmark.sweep.run_one`` and writes the same records to the same
results folder (see ``executors/base.py`` for the contract).
"""

from __future__ import annotations

from benchmark.executors.base import Executor, ExecutorUnavailable
from benchmark.executors.local import LocalExecutor

EXECUTORS = ("local", "ray", "slurm")


def get_executor(name: str, **kwargs) -> Executor:
    """Build an executor by name; a missing optional package raises ExecutorUnavailable with the
    command that installs it."""
    if name == "local":
        return LocalExecutor(**kwargs)
    if name == "ray":
        from benchmark.executors.ray_executor import RayExecutor

        return RayExecutor(**kwargs)
    if name == "slurm":
        from benchmark.executors.slurm import SlurmExecutor

        return SlurmExecutor(**kwargs)
    raise ValueError(f"Unknown executor '{name}'. Available: {', '.join(EXECUTORS)}.")


def check_options(name: str, **options) -> None:
    """Fail early, before any work: a missing optional package (ExecutorUnavailable), no
    SLURM, or options the executor cannot use (ValueError)."""
    if name == "local":
        LocalExecutor.check(**options)
    elif name == "ray":
        from benchmark.executors.ray_executor import RayExecutor

        RayExecutor.check(**options)
    elif name == "slurm":
        from benchmark.executors.slurm import SlurmExecutor

        SlurmExecutor.check(**options)
    else:
        raise ValueError(f"Unknown executor '{name}'. Available: {', '.join(EXECUTORS)}.")


__all__ = ["EXECUTORS", "Executor", "ExecutorUnavailable", "LocalExecutor", "get_executor", "check_options"]
