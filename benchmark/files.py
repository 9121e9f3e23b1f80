"""Writing files so that no reader ever sees half of one, readable by the whole lab.

Every file the harness writes for others to read (records, checkpoints, caches, the
few-shot draws, weights) goes through ``atomic_path``: the content is written to a
temporary file in the same folder, flushed to disk and renamed over the final name.  A
killed process or a full disk leaves the previous file whole and no temporary file.
The file gets the mode a plain ``open`` would give it (0666 less the umask), not the
0600 of a temporary file, so a results folder shared by a group stays readable.

A write that fails for lack of space or permission raises ``OutputError``: an
``OSError`` with the same errno whose message names the file and says how to fix it.

The disk caches store a checksum of their content with each entry and check it when the
entry is read back (``checksum``, ``tensor_checksum``): CRC-32, which finds every error
of up to 32 consecutive bits (a flipped byte) and any other damage (a block overwritten
with other bytes) but for a chance of 2**-32, at several GB/s.  It guards against damage,
not against someone who forges a matching file on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

_FIXES = {
    errno.ENOSPC: "the disk is full: free space on it, or write the results to another disk with --output",
    errno.EDQUOT: "the disk quota is used up: free space, or write the results elsewhere with --output",
    errno.EACCES: "this user may not write there: fix the folder's permissions, or choose another --output",
    errno.EPERM: "this user may not write there: fix the folder's permissions, or choose another --output",
    errno.EROFS: "the file system is read-only: choose a writable folder with --output",
    errno.ENOTDIR: "a file stands where a folder is needed: choose another --output",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit or write elsewhere",
}


class OutputError(OSError):
    """A file could not be written; the message names it and the fix."""


def output_error(exc: OSError, path: str | Path) -> OSError:
    """``exc`` as an ``OutputError`` naming ``path`` and the fix (other errors unchanged)."""
    if isinstance(exc, OutputError) or exc.errno not in _FIXES:
        return exc
    reason = exc.strerror or str(exc)
    return OutputError(exc.errno, f"Cannot write {path}: {reason}; {_FIXES[exc.errno]}. Finished results "
                                  f"are kept; run the same command again once this is fixed.")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block
    ends without an error, removed otherwise."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        _raise_output_error(exc, path)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _raise_output_error(exc, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _raise_output_error(exc: OSError, path: Path):
    error = output_error(exc, path)
    if error is exc:
        raise exc  # not a fault of the output (an unreadable input image, say): as it is
    raise error from exc


def write_atomic(path: str | Path, write: Callable[[Any], None]) -> Path:
    """``write(handle)`` into a binary file handle, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda handle: handle.write(data))


def write_torch_atomic(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)``, atomically.  Serialised in memory first: torch's own writer
    reports a full disk as a bare RuntimeError, a plain write as an OSError with its errno."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON (full float precision), atomically."""
    text = json.dumps(data, indent=2) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` and write a probe file in it, or raise ``OutputError`` with the fix
    (a sweep checks its results folder before any run)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise output_error(exc, folder) from exc


# -- checksums of cached content -------------------------------------------------------------------
CHECKSUM = "crc32"  # the algorithm of ``checksum``, named in the entries that store one


def checksum(*parts: Any) -> str:
    """CRC-32 of the bytes of ``parts`` in order (bytes or C-contiguous buffers such as
    numpy arrays and memory maps, read in place), as 8 hexadecimal digits."""
    value = 0
    for part in parts:
        view = memoryview(part)
        if view.nbytes:  # (an empty view cannot be cast)
            value = zlib.crc32(view.cast("B"), value)
    return f"{value:08x}"


def tensor_checksum(tensor: Any) -> str:
    """``checksum`` of a tensor's dtype, shape and element bytes (any dtype, bfloat16 included)."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    header = f"{flat.dtype}{tuple(tensor.shape)}".encode()
    return checksum(header, flat.view(torch.uint8).numpy())
