"""The local executor: runs on this machine.

Without options, in this process, one run after another.  With several GPUs (``--gpus
0,1``, or every visible GPU when there are several and ``--device`` is ``auto`` or
``cuda``), one worker process per GPU, each seeing only its own GPU through
CUDA_VISIBLE_DEVICES; ``--workers N`` starts N worker processes (per GPU when GPUs are
given, on the CPU otherwise, each with its share of the CPU threads).

Worker processes come from a fork server that imported the trainer once, so that a new
worker starts in a fraction of a second instead of importing torch again.  A worker that
dies mid-run (killed, out of memory) is replaced and its run retried up to
``max_retries`` times; after that the run is reported lost (the sweep records the
failure).  Ctrl-C or SIGTERM stops the workers; the sweep removes their locks.  A worker
ends as soon as the sweep process is gone, however it ended (``kill -9`` included); its
data loader workers follow it, and the fork server ends with the last of them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator, Sequence

from benchmark.executors.base import TICK_S, Executor, lost, signal_text

log = logging.getLogger(__name__)
PRELOAD = ["benchmark.trainer", "benchmark.sweep"]  # imported once by the fork server


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver means no GPU for us
        return 0


def worker_slots(gpus: Sequence[int] | None, workers: int, device: str | None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker process (None: the CPU, or the device as given);
    an empty list means in this process."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1; got {workers}.")
    device = device or "auto"
    if gpus is not None:
        if len(set(gpus)) != len(gpus) or min(gpus, default=0) < 0:
            raise ValueError(f"--gpus takes distinct GPU numbers such as 0,1,2; got {','.join(map(str, gpus))}.")
        if device not in ("auto", "cuda"):
            raise ValueError(f"--gpus pins one worker per GPU, each sees its GPU as cuda:0, so --device must be "
                             f"auto or cuda (got {device}).")
        return [str(g) for g in gpus for _ in range(workers)]
    if device in ("auto", "cuda"):
        n = visible_gpus()
        if n > 1:
            return [str(g) for g in range(n) for _ in range(workers)]
    return [None] * workers if workers > 1 else []


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(*, tiny_model: bool, on_cpu: bool, runs: int) -> int:
    """``--workers`` when it is not given.  The toy and synthetic worlds' CLIPs are so small
    that a training step is bound by the count of operations, not by arithmetic, so a second
    thread in one process gains far less than a second process: on the CPU they get one
    single-thread worker process per CPU core (at most one per run).  Everything else runs
    in this process (a GPU, or real CLIP weights on the CPU, whose large products use every
    thread well and whose copies would fill the memory)."""
    if not (tiny_model and on_cpu) or runs < 2:
        return 1
    return max(1, min(usable_cores(), runs))


@dataclass
class _Worker:
    slot: str | None
    process: Any
    conn: Any
    item: Any = None
    attempt: int = 0


def _sweep_gone(sweep: int) -> None:
    """Wait until the sweep process ``sweep`` has ended, then end this worker at once
    (its data loader workers follow their own process, see benchmark.workers).

    The worker's parent is the fork server, not the sweep, and a busy worker reads nothing
    from the sweep until its run ends, so nothing else would tell it: it would finish its
    run (minutes) for a sweep that no longer exists."""
    from benchmark.workers import wait_for_exit  # preloaded by the fork server

    wait_for_exit(sweep)
    os._exit(1)


def _worker_main(conn, slot: str | None, threads: int, sweep: int | None = None) -> None:
    """A worker process: run ``fn(item)`` for each message until told to stop, or until the
    sweep process ``sweep`` ends."""
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot  # before anything touches CUDA
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep decides when workers stop
    if sweep is not None:
        threading.Thread(target=_sweep_gone, args=(sweep,), name="sweep-watch", daemon=True).start()
    if threads:
        import torch

        torch.set_num_threads(threads)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn, item = message
        try:
            reply = ("ok", fn(item))
        except BaseException as exc:  # reported to the sweep, which records the failure
            reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=20)}")
        try:
            conn.send(reply)
        except (EOFError, OSError):  # the sweep is gone
            return


def _context():
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, *, gpus: Sequence[int] | None = None, workers: int = 1, device: str | None = None,
                 max_retries: int = 2, **_: object):
        self.slots = self.check(gpus=gpus, workers=workers, device=device, max_retries=max_retries)
        if gpus is None and len(self.slots) > workers:
            log.warning("%d GPUs visible: one worker process per GPU (choose with --gpus; --device cuda:0 runs "
                        "one run after another on one GPU)", len(self.slots) // workers)
        self.in_process = not self.slots
        self.parallelism = max(1, len(self.slots))
        self.max_retries = max_retries
        self._workers: list[_Worker] = []

    @staticmethod
    def check(*, gpus: Sequence[int] | None = None, workers: int = 1, device: str | None = None,
              max_retries: int = 2, **_: object) -> list[str | None]:
        """Validate the options (before any work); returns the worker slots."""
        if max_retries < 0:
            raise ValueError(f"--max-retries must be 0 or more; got {max_retries}.")
        return worker_slots(gpus, workers, device)

    def map(self, fn: Callable[[Any], dict], items: Iterable[Any], *,
            tick: Callable[[], None] | None = None) -> Iterator[tuple[Any, dict]]:
        """``(item, fn(item))`` as runs end; exceptions of an in-process ``fn`` propagate."""
        if self.in_process:
            for item in items:
                yield item, fn(item)
            return
        yield from self._pool(fn, list(items), tick or (lambda: None))

    def _threads(self) -> int:
        chosen = os.environ.get("OMP_NUM_THREADS", "")
        if chosen.isdigit() and int(chosen) > 0:
            return int(chosen)  # the user chose (set explicitly: a pre-started process may not have read it)
        return max(1, usable_cores() // len(self.slots))

    def _start(self, ctx, slot: str | None) -> _Worker:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker_main, args=(child, slot, self._threads(), os.getpid()),
                              name=f"sweep-worker-{slot if slot is not None else 'cpu'}")
        process.start()
        child.close()
        worker = _Worker(slot, process, parent)
        self._workers.append(worker)
        return worker

    def _stop(self, worker: _Worker, *, kill: bool) -> None:
        if kill and worker.process.is_alive():
            worker.process.kill()
        elif worker.process.is_alive():
            try:
                worker.conn.send(None)
            except OSError:
                pass
        worker.process.join(timeout=10)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
        if worker in self._workers:
            self._workers.remove(worker)

    @staticmethod
    def _reply(worker: _Worker) -> tuple[str, Any] | None:
        """The worker's reply, ("died", exit code text) if it died, None if still running."""
        try:
            if worker.conn.poll():
                return worker.conn.recv()
        except (EOFError, OSError):
            pass
        else:
            if worker.process.is_alive():
                return None
        worker.process.join(timeout=5)
        return "died", signal_text(worker.process.exitcode)

    def _pool(self, fn: Callable, items: list, tick: Callable[[], None]) -> Iterator[tuple[Any, dict]]:
        ctx = _context()
        queue = deque((item, 1) for item in items)
        free = list(self.slots)
        idle: list[_Worker] = []
        busy: list[_Worker] = []
        attempts = 1 + self.max_retries
        try:
            while queue or busy:
                while queue and (idle or free):
                    worker = idle.pop() if idle else self._start(ctx, free.pop(0))
                    worker.item, worker.attempt = queue.popleft()
                    try:
                        worker.conn.send((fn, worker.item))
                    except OSError:
                        pass  # it died while idle: found below
                    busy.append(worker)
                wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=TICK_S)
                tick()
                for worker in list(busy):
                    reply = self._reply(worker)
                    if reply is None:
                        continue
                    busy.remove(worker)
                    kind, value = reply
                    if kind == "ok":
                        idle.append(worker)
                        yield worker.item, value
                        continue
                    if kind == "error":
                        idle.append(worker)
                        yield worker.item, lost(f"error in the worker process: {value}")
                        continue
                    self._stop(worker, kill=True)
                    free.append(worker.slot)
                    message = (f"the worker process (pid {worker.process.pid}) died ({value}) during "
                               f"attempt {worker.attempt} of {attempts}")
                    if worker.attempt < attempts:
                        log.warning("%s; retrying the run", message)
                        queue.appendleft((worker.item, worker.attempt + 1))
                    else:
                        yield worker.item, lost(message)
        finally:
            for worker in list(self._workers):
                self._stop(worker, kill=worker in busy)

    def close(self) -> None:
        for worker in list(self._workers):
            self._stop(worker, kill=True)
