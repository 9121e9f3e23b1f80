"""Loader worker processes that a sweep's signals do not crash, and that end with their parent.

A sweep ends on Ctrl-C or SIGTERM (the command line turns both into KeyboardInterrupt);
they reach the whole process group, DataLoader workers included.  ``QuietLoader`` is the
DataLoader of every loader of the harness: its workers drop those signals unless their
own loader's process sends them, and end as soon as that process has ended, so that an
interrupted sweep prints one line and leaves no process behind.  ``wait_for_exit`` also
lets a sweep's worker process (``executors/local.py``) end with its sweep.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import select
import signal
import sys
import threading
import time

from torch.utils.data import DataLoader


# Signals that end a sweep: the main process turns them into KeyboardInterrupt and shuts its
# loaders down.  A DataLoader worker ignores them when they come from anyone but its own main
# process, so that a signal to the whole process group (Ctrl-C, a scheduler's kill) does not
# kill workers under a live loader (torch would report each one as a crash).  A worker still
# ends when its loader is shut down, when its main process terminates it (multiprocessing
# does so at exit), and as soon as its main process has ended.  (torch's own watchdog looks
# at the parent process, which under a fork server is the server; the server lives as long
# as any of its children, so workers orphaned there would wait for each other forever.)
_SWEEP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_quiet = False


def quiet_worker(worker_id: int | None = None, parent: int | None = None) -> None:
    """``worker_init_fn`` of every loader of the harness: SIGTERM and SIGINT from another
    process than ``parent`` (the loader's process; default: the one that started this) are
    dropped, one from ``parent`` ends the worker at once, and so does the end of ``parent``.
    Where the sender of a signal cannot be known, both are ignored."""
    global _quiet
    if _quiet:
        return
    _quiet = True
    if parent is None:  # the process that started this one (under a fork server, not the parent)
        creator = multiprocessing.parent_process()
        parent = creator.pid if creator is not None and creator.pid else os.getppid()
    if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        # blocked here (already, under QuietLoader) and so in every thread started later;
        # one thread takes them, pending ones included, and looks at the sender
        signal.pthread_sigmask(signal.SIG_BLOCK, _SWEEP_SIGNALS)
        threading.Thread(target=_take_signals, args=(parent,), name="loader-worker-signals",
                         daemon=True).start()
    else:
        for signum in _SWEEP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(parent,), name="loader-worker-parent", daemon=True).start()


def _take_signals(parent: int) -> None:
    while True:
        if signal.sigwaitinfo(_SWEEP_SIGNALS).si_pid == parent:
            os._exit(0)  # asked by the loader's own process: go now, quietly


def _end_with(parent: int) -> None:
    wait_for_exit(parent)
    os._exit(0)


def wait_for_exit(pid: int) -> None:
    """Return once process ``pid`` has ended (at once if it has already), whoever its
    parent is: through a process handle where the system has them (Linux), else by
    looking twice a second."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except OSError:
                pass  # alive, another user's
            time.sleep(0.5)
    try:
        select.select([handle], [], [])  # readable once the process has ended
    finally:
        os.close(handle)


class QuietLoader(DataLoader):
    """A DataLoader whose workers ignore the sweep's signals (``quiet_worker``).  The main
    thread blocks them while it starts the workers, which inherit the mask, so a signal
    arriving before a worker has run ``quiet_worker`` waits and is then dropped there; the
    main process receives its own copy once the workers are started.

    Its workers stop as soon as an iteration ends, however it ends: an error (an unreadable
    image) would otherwise keep the iterator alive in the traceback's reference cycle, and
    the garbage collector's later shutdown of it waits seconds per worker."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("worker_init_fn", functools.partial(quiet_worker, parent=os.getpid()))
        if kwargs.get("num_workers") and sys.platform.startswith("linux"):
            # forked, as torch does by default on Linux: a sweep's worker process (started by a
            # fork server) would otherwise start its loaders' workers through a fork server of
            # its own, each worker importing torch again: seconds per loader, every epoch
            kwargs.setdefault("multiprocessing_context", "fork")
        super().__init__(*args, **kwargs)

    def __iter__(self):
        iterator = super().__iter__()
        if self.num_workers == 0 or self.persistent_workers:
            return iterator
        return self._stopping_workers(iterator)

    @staticmethod
    def _stopping_workers(iterator):
        try:
            yield from iterator
        finally:
            stop = getattr(iterator, "_shutdown_workers", None)
            if stop is not None:
                stop()

    def _get_iterator(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super()._get_iterator()
        with _signals_deferred():
            saved = signal.pthread_sigmask(signal.SIG_BLOCK, _SWEEP_SIGNALS)
            try:
                return super()._get_iterator()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, saved)


@contextlib.contextmanager
def _signals_deferred():
    """The sweep's signals that arrive while a loader starts its workers are handled once the
    iterator is whole.  Blocking them in this thread is not enough: another thread of the
    process (the live progress display) may take a process-wide signal, and its Python
    handler then raises in this thread, half-way through the iterator's construction, whose
    clean-up then fails noisily.  Here the handlers only note the signal meanwhile; the
    first one noted is passed to the handler it would have met, after the iterator is built
    (which the exception then discards and shuts down in full)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum))
                for signum in _SWEEP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if noted:
        handler = previous[noted[0]]
        if callable(handler):
            handler(noted[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), noted[0])


def worker_count(cfg) -> int:
    """A loader's worker processes: ``DATALOADER.NUM_WORKERS`` as configured, on any machine.

    The count decides which random crops a run trains on, as in the reference toolbox:
    worker w of N seeds its random streams from the loader's base seed plus w and
    augments batches w, w + N, w + 2N, ...  So it is never adapted to the machine (a
    2-core machine runs 8 workers slower, not differently) and it is part of a run's
    identity (``benchmark.protocols``)."""
    count = int(cfg.DATALOADER.NUM_WORKERS)
    if count < 0:
        raise ValueError(f"DATALOADER.NUM_WORKERS must be 0 or more; got {count}.")
    return count
