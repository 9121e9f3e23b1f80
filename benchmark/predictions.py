"""Per-image predictions of a run's evaluations, kept beside its record for paired statistics.

``<output>/predictions/<method>/<protocol>/<dataset>/shots16-seed1-<run id>.npz``: one
compressed numpy archive per run (numbers only, read with ``allow_pickle=False``), for
each evaluation name ``E`` (``base``, ``novel``, ``test``, a transfer target):

* ``E.pred``  the predicted class of every test image, in the order of the test list;
* ``E.label`` its true class (int16 when every class index fits, else int32);
* ``E.images`` a SHA-256 of the test list (image paths relative to the data root, and
  labels), so that two runs are paired only when they saw the same images in the same order.

The record names the file (``predictions``: the path relative to ``<output>``).  It is
written atomically (``benchmark.files``); a run that adds evaluations to an earlier record
(a transfer run asked for more targets) adds them to the same file.  Records made before
prediction files existed have none: ``load`` returns None for them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from benchmark.files import write_bytes_atomic

DIR = "predictions"


class PredictionsError(ValueError):
    """A predictions file that cannot be read or does not hold what its record says."""


@dataclass(frozen=True)
class Predictions:
    pred: np.ndarray  # predicted class per test image
    label: np.ndarray  # true class per test image
    images: str  # SHA-256 of the test list (paths relative to the root, labels)

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label

    @classmethod
    def of(cls, data: Sequence, pred: np.ndarray, root: str | Path = "") -> "Predictions":
        """From a test list (``Datum``s with ``impath`` and ``label``) and its predictions."""
        label = np.array([d.label for d in data], dtype=np.int64)
        return cls(_compact(pred), _compact(label), test_list_digest(data, root))


def _compact(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    fits = values.size == 0 or (values.min() >= np.iinfo(np.int16).min and values.max() <= np.iinfo(np.int16).max)
    return values.astype(np.int16 if fits else np.int32)


def test_list_digest(data: Sequence, root: str | Path = "") -> str:
    """SHA-256 of the test images (paths relative to ``root`` where they lie under it) and labels."""
    root = str(root).rstrip("/") + "/" if str(root) else ""
    digest = hashlib.sha256()
    for d in data:
        path = str(d.impath)
        digest.update(f"{path[len(root):] if root and path.startswith(root) else path}\t{d.label}\n".encode())
    return digest.hexdigest()


def relative_path(spec) -> str:
    """Where a run's predictions go, relative to the output folder (``spec``: a run spec or a record)."""
    run_id = spec.run_id if hasattr(spec, "run_id") else spec["id"]
    get = (lambda k: getattr(spec, k)) if hasattr(spec, "run_id") else spec.__getitem__
    return f"{DIR}/{get('method')}/{get('protocol')}/{get('dataset')}/shots{get('shots')}-seed{get('seed')}-{run_id}.npz"


def write(path: str | Path, evaluations: Mapping[str, Predictions]) -> Path:
    """Write ``evaluations`` (name -> Predictions) to ``path`` atomically, keeping the
    evaluations an earlier file there holds and ``evaluations`` does not replace."""
    path = Path(path)
    merged = dict(read(path)) if path.is_file() else {}
    merged.update(evaluations)
    arrays = {}
    for name, p in merged.items():
        if len(p.pred) != len(p.label):
            raise PredictionsError(f"{name}: {len(p.pred)} predictions for {len(p.label)} images")
        arrays.update({f"{name}.pred": _compact(p.pred), f"{name}.label": _compact(p.label),
                       f"{name}.images": np.array(p.images)})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def read(path: str | Path) -> dict[str, Predictions]:
    """name -> Predictions of a file written by ``write``; ``PredictionsError`` when it is not one."""
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise
    except Exception as exc:  # a cut or foreign file: zip, npy or pickle errors
        raise PredictionsError(f"{path} is not a predictions file of this harness: {exc}") from exc
    names = sorted({key.rsplit(".", 1)[0] for key in arrays})
    out = {}
    for name in names:
        try:
            out[name] = Predictions(arrays[f"{name}.pred"], arrays[f"{name}.label"], str(arrays[f"{name}.images"]))
        except KeyError as exc:
            raise PredictionsError(f"{path}: evaluation {name!r} lacks {exc.args[0]}") from None
    return out


def load(output: str | Path, record: dict) -> dict[str, Predictions] | None:
    """The predictions a record names, or None when it names none (an older record) or
    its file is gone."""
    name = record.get("predictions")
    if not name:
        return None
    path = Path(output) / name
    try:
        return read(path)
    except FileNotFoundError:
        return None
