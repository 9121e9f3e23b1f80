"""The Ray executor: each run is a Ray task.

A task asks for one GPU (and the cluster's CPUs per GPU) when the cluster has GPUs and
``--device`` is not ``cpu``; otherwise one CPU.  Without ``--ray-address`` a local Ray
instance starts and stops with the sweep; with it (``auto``, ``ray://head:10001``) the
sweep joins that cluster, whose workers must import this project (installed, or on a
file system they share with the results folder).  Ray retries a task whose worker died
(killed, node lost, out of memory) up to ``max_retries`` times; after that, or when an
error escapes the task, the run is reported lost and the sweep records the failure.
Errors inside a run are not retried: they write a failed record, as with every executor.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

from benchmark.executors.base import TICK_S, Executor, import_optional, lost

log = logging.getLogger(__name__)
INSTALL_HINT = ("--executor ray needs Ray, which is not installed in this Python environment. Install it "
                "with `pip install -e \".[ray]\"` from the repository (or `pip install \"ray>=2.9\"`) and run "
                "the same command again, or use --executor local (this machine) or --executor slurm.")


def import_ray():
    return import_optional("ray", INSTALL_HINT)


def _call(fn: Callable[[Any], dict], item: Any) -> dict:
    return fn(item)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, *, address: str | None = None, device: str | None = None, max_retries: int = 2,
                 **_: object):
        ray = self.check(device=device, max_retries=max_retries)
        device = device or "auto"
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
            self._started = True
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if device == "cuda" and not gpus:
            raise RuntimeError("--device cuda, but the Ray cluster has no GPU; use --device auto or cpu.")
        if gpus and device != "cpu":
            self.task_options = {"num_gpus": 1, "num_cpus": max(1, cpus // gpus)}
            self.parallelism = gpus
        else:
            self.task_options = {"num_cpus": 1}
            self.parallelism = cpus
        self.max_retries = max_retries

    @staticmethod
    def check(*, device: str | None = None, max_retries: int = 2, **_: object):
        """Validate the options and import Ray (before any work); returns the module."""
        if max_retries < 0:
            raise ValueError(f"--max-retries must be 0 or more; got {max_retries}.")
        if (device or "auto") not in ("auto", "cuda", "cpu"):
            raise ValueError(f"With --executor ray each run gets a GPU of its own (it sees it as cuda:0): use "
                             f"--device auto, cuda or cpu (got {device}).")
        return import_ray()

    def map(self, fn: Callable[[Any], dict], items: Iterable[Any], *,
            tick: Callable[[], None] | None = None) -> Iterator[tuple[Any, dict]]:
        ray = self._ray
        remote = ray.remote(_call).options(max_retries=self.max_retries, retry_exceptions=False,
                                            **self.task_options)
        fn_ref = ray.put(fn)
        pending = {remote.remote(fn_ref, item): item for item in items}
        attempts = 1 + self.max_retries
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=TICK_S)
                if tick:
                    tick()
                for ref in ready:
                    item = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        text = str(exc).strip().splitlines()
                        outcome = lost(f"{type(exc).__name__} after at most {attempts} attempts: "
                                       f"{' '.join(text[:3])[:600]}")
                    yield item, outcome
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone
                    pass

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False
