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


def options_from_args(args) -> dict:
    """The chosen executor's options from the run command's; options of another executor
    and a missing optional package (Ray, submitit) are errors before any work."""
    given = {"--gpus": args.gpus is not None, "--workers": args.workers is not None,
             "--ray-address": args.ray_address is not None,
             **{f"--slurm-{name.replace('_', '-')}": getattr(args, f"slurm_{name}") is not None
                for name in ("partition", "time", "gpus", "cpus", "mem", "array_parallelism", "config", "cluster")}}
    owner = {"local": ("--gpus", "--workers"), "ray": ("--ray-address",)}
    for option, present in given.items():
        belongs = next((name for name, options in owner.items() if option in options), "slurm")
        if present and belongs != args.executor:
            raise ValueError(f"{option} is an option of --executor {belongs}, but the executor is {args.executor}. "
                             f"Add --executor {belongs} or leave {option} out.")
    if args.stale_lock_minutes <= 0:
        raise ValueError(f"--stale-lock-minutes must be positive; got {args.stale_lock_minutes}.")
    options = {"device": args.device, "max_retries": args.max_retries}
    if args.executor == "local":
        options.update(gpus=args.gpus, workers=1 if args.workers is None else args.workers)
    elif args.executor == "ray":
        options.update(address=args.ray_address)
    else:
        options.update(output=args.output, cluster=args.slurm_cluster or "slurm", partition=args.slurm_partition,
                       time=args.slurm_time, gpus=args.slurm_gpus, cpus=args.slurm_cpus, mem=args.slurm_mem,
                       array_parallelism=args.slurm_array_parallelism, config=args.slurm_config)
    check_options(args.executor, **options)
    return options
