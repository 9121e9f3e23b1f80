"""Result records on disk: one JSON file per run, written atomically.

``<output>/records/<method>/<protocol>/<dataset>/seed<S>-<run id>.json``.  A record is
written to a temporary file in the same folder, flushed to disk and renamed over its
final name, so a reader (or a sweep killed mid-write) never sees half a record.  Values
keep full precision; only tables round.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

RECORD_DIR = "records"


def record_path(output: str | Path, spec) -> Path:
    return (Path(output) / RECORD_DIR / spec.method / spec.protocol / spec.dataset
            / f"shots{spec.shots}-seed{spec.seed}-{spec.run_id}.json")


def checkpoint_path(output: str | Path, spec) -> Path:
    return (Path(output) / "checkpoints" / spec.method / spec.protocol / spec.dataset
            / f"shots{spec.shots}-seed{spec.seed}-{spec.run_id}.pt")


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
