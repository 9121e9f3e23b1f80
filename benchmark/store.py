"""Result records on disk: one JSON file per run, written atomically, and run locks.

``<output>/records/<method>/<protocol>/<dataset>/seed<S>-<run id>.json``.  A record is
written to a temporary file in the same folder, flushed to disk and renamed over its
final name, so a reader (or a sweep killed mid-write) never sees half a record.  Values
keep full precision; only tables round.  What a record holds is ``benchmark.records``.

A record file that does not fit the schema (cut or edited by hand) never stops a sweep
or a table: ``scan_records`` lists it apart with the reason, tables say how many they
skipped, and a sweep that reaches its run moves it to ``<output>/quarantine/`` (with a
``.reason.json`` beside it) and does the run again.

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
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from benchmark import records
from benchmark.files import write_json_atomic

log = logging.getLogger(__name__)

RECORD_DIR = "records"
QUARANTINE_DIR = "quarantine"  # damaged records, moved out of records/ with the reason
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


def read_record(path: str | Path) -> records.Record | None:
    """The record at ``path``; None when there is none; ``DamagedRecord`` when the file is
    there but is not a record of the schema (cut or edited by hand, or not JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedRecord(path, f"cannot be read ({exc})") from None
    try:
        return records.validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise DamagedRecord(path, f"is not complete JSON ({exc})") from None
    except records.RecordError as exc:
        raise DamagedRecord(path, str(exc)) from None


class DamagedRecord(ValueError):
    """A record file that does not fit the record schema."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def previous_record(output: str | Path, spec) -> records.FinishedRecord | None:
    """The spec's successful record (same identity), complete or not; None when there is
    none or it is damaged (``set_aside_damaged`` moves a damaged one out of the way)."""
    try:
        record = read_record(record_path(output, spec))
    except DamagedRecord:
        return None
    if record is None or not records.is_finished_record(record) or record["id"] != spec.run_id:
        return None
    return record  # type: ignore[return-value]


def is_finished(output: str | Path, spec) -> bool:
    """A successful record of the same identity with every evaluation the spec asks for."""
    record = previous_record(output, spec)
    return record is not None and not records.missing_evals(record, spec)


def damaged_record(output: str | Path, spec) -> DamagedRecord | None:
    """What is wrong with the spec's record file, or None when it is absent or sound."""
    try:
        read_record(record_path(output, spec))
    except DamagedRecord as damaged:
        return damaged
    return None


def quarantine_path(output: str | Path, path: str | Path) -> Path:
    """Where a damaged record is moved: ``<output>/quarantine/`` + its path under records/."""
    path = Path(path)
    try:
        relative = path.relative_to(Path(output) / RECORD_DIR)
    except ValueError:
        relative = Path(path.name)
    return Path(output) / QUARANTINE_DIR / relative


def set_aside_damaged(output: str | Path, spec) -> Path | None:
    """Move the spec's damaged record to the quarantine folder, with a note of what was
    wrong beside it; returns where it went (None when the record is absent or sound).
    Called under the run's lock, so that no other sweep writes the record meanwhile."""
    damaged = damaged_record(output, spec)
    if damaged is None:
        return None
    target = quarantine_path(output, damaged.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # an earlier damaged copy: keep both
        target = target.with_name(f"{target.stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json")
    os.replace(damaged.path, target)
    write_json_atomic(target.with_suffix(".reason.json"), {"record": str(damaged.path), "reason": damaged.reason,
                                                          "moved": time.time()})
    log.warning("the record %s is damaged (%s): moved to %s; its run is done again",
                damaged.path, damaged.reason, target)
    return target


@dataclass
class RecordScan:
    """Every record under an output folder: the sound ones, and the damaged ones with why."""

    records: list = field(default_factory=list)
    damaged: list[DamagedRecord] = field(default_factory=list)


def scan_records(output: str | Path) -> RecordScan:
    scan = RecordScan()
    root = Path(output) / RECORD_DIR
    if not root.is_dir():
        return scan
    for path in sorted(root.rglob("*.json")):
        try:
            record = read_record(path)
        except DamagedRecord as damaged:
            scan.damaged.append(damaged)
            continue
        if record is not None:
            record["_path"] = str(path)
            scan.records.append(record)
    return scan


def iter_records(output: str | Path) -> Iterator[records.Record]:
    """The sound records under ``output`` (``scan_records`` also lists the damaged ones)."""
    yield from scan_records(output).records


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
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # less the umask
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
