"""Where a run executes.  ``local``: in this process, one run after another."""

from benchmark.executors.local import LocalExecutor

EXECUTORS = {"local": LocalExecutor}


def get_executor(name: str, **kwargs):
    if name not in EXECUTORS:
        raise ValueError(f"Unknown executor '{name}'. Available: {', '.join(EXECUTORS)}.")
    return EXECUTORS[name](**kwargs)
