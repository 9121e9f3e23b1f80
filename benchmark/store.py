"""Result records on disk: one JSON file per run, written atomically, and run locks.

``<output>/records/<method>/<protocol>/<dataset>/seed<S>-<run id>.json``.  A record is
written to a temporary file in the same folder, flushed to disk and renamed over its
final name, so a reader (or a sweep killed mid-write) never sees half a record.  Values
keep full precision; only tables round.

The results folder is the only state that sweeps share, whatever runs them (this
process, worker processes, Ray tasks, SLURM jobs, on any machine that mounts it).  A run
in progress holds a lock file next to its record (``...-<run id>.lock``), created with
O_CREAT|O_EXCL so that exactly one process gets it, holding the host, process id, start
time and sweep.  Its holder touches it every ``LOCK_HEARTBEAT_S`` seconds and removes it
when the run ends.  A lock is stale, and taken over with a warning, when its process is
gone (same host), when it was left by an earlier attempt of the same sweep (the executor
gave that attempt up), or when it has not been touched for ``stale_after`` seconds (a
dead machine).  Two sweeps on one folder therefore never run the same run at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

RECORD_DIR = "records"
LOCK_HEARTBEAT_S = 30.0  # how often a running run touches its lock
STALE_LOCK_S = 600.0  # a lock untouched this long belongs to a dead process or machine
_FRESH_LOCK_S = 5.0  # an unreadable lock younger than this is being written, not broken


def record_path(output: str | Path, spec) -> Path:
    return (Path(output) / RECORD_DIR / spec.method / spec.protocol / spec.dataset
            / f"shots{spec.shots}-seed{spec.seed}-{spec.run_id}.json")


def checkpoint_path(output: str | Path, spec) -> Path:
    return (Path(output) / "checkpoints" / spec.method / spec.protocol / spec.dataset
            / f"shots{spec.shots}-seed{spec.seed}-{spec.run_id}.pt")


def log_path(output: str | Path, spec) -> Path:
    """The run's own log (every message of the run, epochs included), beside nothing else."""
    return (Path(output) / "logs" / spec.method / spec.protocol / spec.dataset
            / f"shots{spec.shots}-seed{spec.seed}-{spec.run_id}.log")


def lock_path(output: str | Path, spec) -> Path:
    return record_path(output, spec).with_suffix(".lock")


def write_json_atomic(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_record(path: str | Path) -> dict | None:
    """The record at path, or None if it does not exist or is not a complete record."""
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "id" in data else None


def previous_record(output: str | Path, spec) -> dict | None:
    """The spec's successful record (same identity), complete or not."""
    record = read_record(record_path(output, spec))
    if record is None or record.get("status") != "ok" or record.get("id") != spec.run_id:
        return None
    return record


def missing_evals(record: dict, spec) -> list:
    return [e for e in spec.evals if e.name not in record.get("metrics", {})]


def is_finished(output: str | Path, spec) -> bool:
    """A successful record of the same identity with every evaluation the spec asks for."""
    record = previous_record(output, spec)
    return record is not None and not missing_evals(record, spec)


def iter_records(output: str | Path) -> Iterator[dict]:
    root = Path(output) / RECORD_DIR
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.json")):
        record = read_record(path)
        if record is not None:
            record["_path"] = str(path)
            yield record


# -- run locks ------------------------------------------------------------------------------------
class LockHeld(RuntimeError):
    """The run is locked by another live process (another sweep, or another worker)."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = Path(path), holder
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("started", 0)))
        super().__init__(f"running elsewhere: process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                         f"since {since} (lock {path})")


class RunLock:
    """A held lock: touched every ``heartbeat`` seconds by a daemon thread until released."""

    def __init__(self, path: Path, token: str, heartbeat: float = LOCK_HEARTBEAT_S):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                                        name=f"lock-heartbeat-{path.stem}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        holder = _read_lock(self.path)
        if holder is not None and holder.get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid) -> bool:
    """Whether a process of this host with that id exists (a zombie counts as gone)."""
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale_reason(holder: dict | None, age: float, *, sweep: str = "",
                 stale_after: float = STALE_LOCK_S) -> str | None:
    """Why a lock with this content and age (seconds since last touched) is stale, or None."""
    if holder is None:
        return "it is unreadable" if age > _FRESH_LOCK_S else None
    if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
        return f"its process {holder.get('pid')} is gone"
    if sweep and holder.get("sweep") == sweep and holder.get("host") != socket.gethostname():
        return "an earlier attempt of this sweep left it"
    if age > stale_after:
        return f"it was not touched for {age:.0f} s (limit {stale_after:.0f} s)"
    return None


def lock_holder(path: str | Path) -> dict | None:
    """The content of a lock file (host, pid, started, sweep), or None when there is none."""
    return _read_lock(Path(path))


def acquire_lock(path: str | Path, *, sweep: str = "", stale_after: float = STALE_LOCK_S,
                 heartbeat: float = LOCK_HEARTBEAT_S) -> RunLock:
    """Take the run lock at ``path`` or raise ``LockHeld`` naming its live holder.

    A stale lock is removed (with a warning) and the creation tried again; removal goes
    through an atomic rename and a check that the renamed file is the stale one, so two
    sweeps that find the same stale lock never both take it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            reason = stale_reason(holder, age, sweep=sweep, stale_after=stale_after)
            if reason is None:
                raise LockHeld(path, holder or {}) from None
            if _remove_stale(path, holder):
                log.warning("taking over the lock %s: %s", path, reason)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "sweep": sweep, "token": token}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return RunLock(path, token, heartbeat)
    raise LockHeld(path, _read_lock(path) or {})


def _remove_stale(path: Path, seen: dict | None) -> bool:
    """Remove the lock at path if it is still the one read as ``seen``."""
    grave = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return False  # another sweep removed it first
    now = _read_lock(grave)
    if (now or {}).get("token") != (seen or {}).get("token"):
        try:  # a fresh lock was taken between our read and the rename: put it back
            os.link(grave, path)
        except FileExistsError:
            pass
        grave.unlink()
        return False
    grave.unlink()
    return True


def remove_own_lock(path: str | Path, sweep: str) -> bool:
    """Remove a lock left by this sweep (its worker was killed); True if one was removed."""
    holder = _read_lock(Path(path))
    if holder is None or not sweep or holder.get("sweep") != sweep:
        return False
    return _remove_stale(Path(path), holder)
