"""``python run.py verify RECORD|FOLDER``: run a finished run again and say whether it comes out the same.

A reader of someone else's results folder can check a number without trusting it: each
finished record is turned back into its run spec (its resolved config, merged over this
harness's defaults so that keys added later take the values that reproduce the earlier
computation), run again from scratch in a temporary folder (fresh caches, its own few-shot
draw), and compared with what the record and its files say:

* every evaluation's per-image predictions (how many test images are predicted otherwise)
  and its accuracy;
* the learned tensors: against the run's checkpoint where the folder keeps one (the largest
  element-wise difference), otherwise against the summaries in the record (equal SHA-256
  digests mean bit-identical tensors; otherwise the differences of the norms and largest
  magnitudes bound the difference from below);
* the environment: what differs between the machine that made the record and this one
  (library versions, device, CPU kernels, threads), the usual cause of rounding-level
  differences.

Nothing in the results folder is written.  The data are found under the record's
``DATASET.ROOT``, or under ``--root``; the toy and synthetic worlds are this machine's copy
(checked against its manifest, written where missing: their datasets are the same on every
machine).  The backbone must be the one
the record names (its fingerprint is checked first).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmark import records as R

log = logging.getLogger(__name__)


class VerifyError(ValueError):
    """A record that cannot be run again here; the message says why and what to pass."""


@dataclass
class Verdict:
    """The comparison of one record with its re-run."""

    label: str
    path: str
    identical: bool = False
    skipped: str = ""  # why the run could not be repeated ("" when it was)
    predictions: dict = field(default_factory=dict)  # eval -> (differing images, images)
    accuracy: dict = field(default_factory=dict)  # eval -> (recorded, re-run)
    weights: dict = field(default_factory=dict)  # tensor -> {"max_abs": x} or {"at_least": x} or {"same": True}
    weights_source: str = ""  # "checkpoint" or "summary" or "" (nothing to compare with)
    environment: dict = field(default_factory=dict)  # field -> (recorded, now), where they differ
    notes: list[str] = field(default_factory=list)  # what the reader should know
    gaps: list[str] = field(default_factory=list)  # what could not be compared (no verdict "identical")

    @property
    def differing_predictions(self) -> int:
        return sum(n for n, _ in self.predictions.values())

    @property
    def largest_weight_difference(self) -> float | None:
        values = [v.get("max_abs", v.get("at_least", 0.0)) for v in self.weights.values()]
        return max(values) if values else None

    def summary(self) -> str:
        if self.skipped:
            return f"not repeated: {self.skipped}"
        if self.identical:
            return "identical"
        parts = []
        images = sum(total for _, total in self.predictions.values())
        if self.differing_predictions:
            parts.append(f"{self.differing_predictions} of {images} test predictions differ")
        moved = {k: v for k, v in self.accuracy.items() if v[0] is None or v[1] is None or abs(v[0] - v[1]) > 1e-9}
        for name, (old, new) in moved.items():
            parts.append(f"{name} accuracy {_pct(old)} recorded, {_pct(new)} re-run")
        largest = self.largest_weight_difference
        if largest:
            bound = "" if self.weights_source == "checkpoint" else "at least "
            parts.append(f"learned weights differ by {bound}{largest:.3g}")
        elif any(not v.get("same", False) for v in self.weights.values()):
            parts.append("learned weights differ (not bit-identical)")
        return "; ".join(parts + self.gaps) or "differs"

    def decide(self) -> None:
        """Identical: every prediction and accuracy the same, every learned tensor bit for bit,
        and nothing left uncompared."""
        self.identical = (not self.skipped and not self.gaps and not self.differing_predictions
                          and all(v.get("same", False) for v in self.weights.values())
                          and all(a is not None and b is not None and abs(a - b) <= 1e-9
                                  for a, b in self.accuracy.values()))


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- finding records ----------------------------------------------------------------------------
def output_of(record_path: Path) -> Path:
    """The results folder a record file lies in (``<output>/records/.../x.json``)."""
    for parent in record_path.resolve().parents:
        if parent.name == "records":
            return parent.parent
    raise VerifyError(f"{record_path} does not lie in a results folder (no 'records' folder above it).")


def find_records(path: str | Path) -> list[tuple[Path, dict]]:
    """(record file, record) of every finished record at ``path`` (a record file or a results folder)."""
    from benchmark import store

    path = Path(path)
    if path.is_file():
        record = store.read_record(path)
        if record is None or not R.is_finished_record(record):
            raise VerifyError(f"{path} is not a finished run's record (status {record.get('status') if record else None}).")
        return [(path, record)]
    if not path.is_dir():
        raise VerifyError(f"{path} is neither a record file nor a results folder.")
    scan = store.scan_records(path)
    for damaged in scan.damaged:
        log.warning("Skipping the damaged record %s (%s).", damaged.path, damaged.reason)
    found = [(Path(r.pop("_path")), r) for r in scan.records if R.is_finished_record(r)]
    if not found:
        raise VerifyError(f"No finished record under {path}/records.")
    return found


# -- the run again --------------------------------------------------------------------------------
def rerun_config(record: dict, root: str, cache_dir: str) -> dict:
    """The record's resolved config merged over this harness's defaults (every registered
    method's options included), with the data root and a fresh cache folder."""
    from benchmark import config as C
    from methods.registry import add_method_defaults

    cfg = C.get_cfg_default()
    add_method_defaults(cfg)
    stored = json.loads(json.dumps(record.get("config") or {}))
    if not stored:
        raise VerifyError("the record holds no resolved config")
    try:
        C.merge_dict(cfg, stored, "the record's config")
    except C.ConfigError as exc:
        raise VerifyError(f"its config does not fit this harness ({exc})") from exc
    cfg.DATASET.ROOT = str(root)
    cfg.SPEED.CACHE_DIR = str(cache_dir)
    return C.to_dict(cfg)


def _data_root(record: dict, root: str | None, scratch: Path, announce: Callable[[str], None]) -> str:
    """``root``, else the record's data root; a built-in world's root that is missing here is
    written (into the machine's world cache) when this harness writes the same world: the
    folder's name holds the world's version and a digest of the code that writes it."""
    from datasets.worlds import prepare_world, world_folder_name

    if root is not None:
        return str(root)
    recorded = str((record.get("config") or {}).get("DATASET", {}).get("ROOT", ""))
    world = record.get("world", "real")
    if world in ("toy", "synthetic") and Path(recorded).name == world_folder_name(world):
        return str(prepare_world(world, scratch, announce))  # this machine's copy, checked against its manifest
    if recorded and Path(recorded).is_dir():
        return recorded
    raise VerifyError(f"its data root {recorded or '(none)'} does not exist here; pass --root DATA (the folder "
                      f"holding the datasets in the reference layout).")


def _spec(record: dict, config: dict):
    from benchmark.protocols import EvalSpec, RunSpec

    evals = tuple(EvalSpec(e["name"], e["dataset"], e.get("subsample", "all")) for e in record["evals"])
    return RunSpec(method=record["method"], protocol=record["protocol"], stage=record.get("stage", ""),
                   dataset=record["dataset"], seed=record["seed"], shots=record["shots"],
                   subsample=record.get("subsample", "all"), backbone=record["backbone"],
                   backbone_id=record.get("backbone_id", ""), evals=evals, config=config,
                   grid=dict(record.get("grid", {})), grid_plain=bool(record.get("grid_plain", False)))


def _check_backbone(record: dict, clip: str | None) -> str:
    from benchmark.backbone import BackboneError, backbone_fingerprint

    backbone = clip or record["backbone"]
    try:
        fingerprint = backbone_fingerprint(backbone)
    except (BackboneError, OSError) as exc:
        raise VerifyError(f"its backbone {backbone} cannot be found here ({exc}); pass --clip WEIGHTS") from exc
    if record.get("backbone_id") and fingerprint != record["backbone_id"]:
        raise VerifyError(f"the backbone {backbone} is not the one the record was made with (fingerprint "
                          f"{fingerprint}, the record's {record['backbone_id']}); pass --clip with those weights")
    return backbone


def verify_record(path: Path, record: dict, *, root: str | None = None, clip: str | None = None,
                  device: str = "auto", announce: Callable[[str], None] = log.info) -> Verdict:
    """Run ``record``'s run again in a temporary folder and compare (see the module docstring)."""
    from benchmark import predictions as per_image
    from benchmark import store
    from benchmark.trainer import execute
    from methods.registry import get_method

    label = f"{record['method']}/{record['protocol']}/{record['dataset']}/shots{record['shots']}/seed{record['seed']}"
    verdict = Verdict(label=label, path=str(path))
    output = output_of(path)
    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        scratch = Path(scratch)
        try:
            info = get_method(record["method"])
            backbone = _check_backbone(record, clip)
            data_root = _data_root(record, root, scratch, announce)
            spec = _spec(record, rerun_config(record, data_root, str(scratch / "cache")))
            spec.backbone = backbone
        except (VerifyError, ValueError) as exc:
            verdict.skipped = str(exc)
            return verdict
        if spec.run_id != record["id"]:
            verdict.notes.append(f"the identity computed now ({spec.run_id}) is not the record's ({record['id']}): "
                                 "the harness's identity rules or the method changed since it was made")
        if record.get("method_version", 1) != info.version:
            verdict.notes.append(f"the record was made by version {record.get('method_version', 1)} of the method, "
                                 f"this harness has version {info.version}")
        announce(f"verify: running {label} again")
        fresh_ckpt = scratch / "checkpoint.pt"
        with _threads_of(record):
            again = execute(spec, device, output=scratch / "out", checkpoint=fresh_ckpt, save_checkpoint=True)
        _compare_predictions(verdict, record, per_image.load(output, record),
                             per_image.load(scratch / "out", again), again)
        kept = _kept_checkpoint(record, output, store)
        if kept is not None and fresh_ckpt.is_file():
            verdict.weights_source = "checkpoint"
            verdict.weights = _checkpoint_difference(kept, fresh_ckpt)
        elif "learned" in record:
            verdict.weights_source = "summary"
            verdict.weights = _summary_difference(record["learned"], again.get("learned", {}))
        else:
            verdict.gaps.append("the record keeps neither a checkpoint nor a summary of its learned weights "
                                "(made before summaries were recorded)")
        if kept is None and record.get("checkpoint"):
            verdict.notes.append(f"its checkpoint {record['checkpoint']} is not in the folder")
        now = again.get("environment", {})
        verdict.environment = {key: (value, now.get(key)) for key, value in (record.get("environment") or {}).items()
                               if key != "later_evaluations" and now.get(key) != value}
    verdict.decide()
    return verdict


@contextlib.contextmanager
def _threads_of(record: dict):
    """The run's thread count, where the record names it: a reduction split over another
    number of threads adds its terms in another order (rounding-level differences).  The
    CPU's kernels (``cpu_capability``) are chosen when torch starts and cannot be set here:
    ``ATEN_CPU_CAPABILITY`` in the environment of the command does it."""
    import torch

    threads = (record.get("environment") or {}).get("threads")
    before = torch.get_num_threads()
    if isinstance(threads, int) and threads > 0 and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _compare_predictions(verdict: Verdict, record: dict, before, after, again: dict) -> None:
    for name, value in record["metrics"].items():
        if value.get("status") == "not_applicable":
            continue
        new = again["metrics"].get(name, {})
        verdict.accuracy[name] = (value.get("accuracy"), new.get("accuracy"))
        if before is None or name not in before:
            verdict.gaps.append(f"no per-image predictions kept for {name} (made before they were stored)")
            continue
        if after is None or name not in after:
            verdict.gaps.append(f"evaluation {name} gave no predictions on the re-run")
            continue
        old_p, new_p = before[name], after[name]
        if len(old_p.pred) != len(new_p.pred) or old_p.images != new_p.images:
            verdict.gaps.append(f"evaluation {name}: the test images are not the same ({len(old_p.pred)} recorded, "
                                f"{len(new_p.pred)} now)")
            verdict.predictions[name] = (len(new_p.pred), len(new_p.pred))
            continue
        verdict.predictions[name] = (int(np.sum(old_p.pred != new_p.pred)), len(new_p.pred))


def _kept_checkpoint(record: dict, output: Path, store) -> Path | None:
    """The run's checkpoint: in the results folder being verified (a folder may have been
    copied or moved since), else where the record says it was written."""
    from types import SimpleNamespace

    made = SimpleNamespace(method=record["method"], protocol=record["protocol"], dataset=record["dataset"],
                           shots=record["shots"], seed=record["seed"], run_id=record["id"])
    candidates = [store.checkpoint_path(output, made)]
    if record.get("checkpoint"):
        named = Path(record["checkpoint"])
        candidates.append(named if named.is_absolute() else output / named)
    return next((c for c in candidates if c.is_file()), None)


def _checkpoint_difference(kept: Path, fresh: Path) -> dict:
    import torch

    try:
        a = torch.load(kept, map_location="cpu", weights_only=True)["state"]
        b = torch.load(fresh, map_location="cpu", weights_only=True)["state"]
    except Exception as exc:
        return {"(checkpoint)": {"max_abs": float("inf"), "error": f"{kept} cannot be read: {exc}"}}
    out = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            out[key] = {"same": x == y} if not (isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor)) \
                else {"max_abs": float("inf")}
            continue
        if x.shape != y.shape:
            out[key] = {"max_abs": float("inf")}
            continue
        same = torch.equal(x, y)  # bit identity is the question asked here
        diff = 0.0 if same or not x.numel() else float((x.double() - y.double()).abs().max())
        out[key] = {"same": same, "max_abs": diff}
    return out


def _summary_difference(recorded: dict, now: dict) -> dict:
    out = {}
    for key in sorted(set(recorded) | set(now)):
        a, b = recorded.get(key), now.get(key)
        if a is None or b is None or a.get("shape") != b.get("shape"):
            out[key] = {"at_least": float("inf")}
        elif a.get("sha256") == b.get("sha256"):
            out[key] = {"same": True}
        else:  # |‖a‖ − ‖b‖| ≤ ‖a − b‖ and |max|a| − max|b|| ≤ max|a − b|
            out[key] = {"at_least": max(abs(a["absmax"] - b["absmax"]),
                                        abs(a["l2"] - b["l2"]) / max(1.0, float(np.prod(a["shape"]))) ** 0.5)}
    return out


def verify(path: str | Path, *, root: str | None = None, clip: str | None = None, device: str = "auto",
           limit: int | None = None, methods: Sequence[str] | None = None,
           announce: Callable[[str], None] = log.info) -> list[Verdict]:
    """A verdict per finished record at ``path`` (a record file or a results folder)."""
    found = find_records(path)
    if methods:
        found = [(p, r) for p, r in found if r["method"] in set(methods)]
    if limit is not None:
        found = found[:max(0, int(limit))]
    return [verify_record(p, r, root=root, clip=clip, device=device, announce=announce) for p, r in found]


# -- the command line -------------------------------------------------------------------------------
def add_verify_parser(sub) -> None:
    """The ``verify`` sub-command's arguments (``benchmark.cli`` calls this)."""
    import argparse

    parser = sub.add_parser(
        "verify", help="run finished runs again from their records and say whether they come out the same",
        description="Runs each finished run again from its record's resolved config, in a temporary folder "
                    "(fresh caches, the results folder untouched), and compares it with the record: per-image test "
                    "predictions, accuracies and the learned weights (against the run's checkpoint where the folder "
                    "keeps one, else against the record's summaries), and names what differs between the machine "
                    "that made the record and this one. Exit status 0 when every run is identical, 1 otherwise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python run.py verify results/runs/records/mma/base2novel/eurosat/shots16-seed1-<id>.json\n"
               "  python run.py verify results/runs --methods mma --limit 3\n"
               "  python run.py verify colleague/results --root /data/coop --clip ViT-B-16.pt --device cuda")
    parser.add_argument("path", help="a record file, or a results folder (every finished record in it)")
    parser.add_argument("--root", default=None,
                        help="the folder holding the datasets (default: the record's own DATASET.ROOT; the toy and "
                             "synthetic worlds are this machine's copy, written where missing)")
    parser.add_argument("--clip", default=None,
                        help="the backbone weights, when the record's backbone is not found here (checked against "
                             "the record's fingerprint)")
    parser.add_argument("--methods", type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                        default=None, help="only the records of these methods, e.g. --methods mma,coop")
    parser.add_argument("--limit", type=int, default=None, help="at most this many records (in path order)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def show_verdicts(verdicts: Sequence[Verdict], console) -> int:
    """The verdicts as a table on ``console`` (rich), then the notes; the command's exit status."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="verify: each run again against its record", show_lines=False)
    for column in ("run", "verdict", "environment that differs"):
        table.add_column(column, overflow="fold")
    for v in verdicts:
        where = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in v.environment.items()) or "-"
        table.add_row(escape(v.label), escape(v.summary()), escape(where))
    console.print(table)
    for v in verdicts:
        for note in v.notes:
            console.print(f"{v.label}: {note}", soft_wrap=True, markup=False, highlight=False)
    same = sum(v.identical for v in verdicts)
    console.print(f"{same} of {len(verdicts)} run(s) identical.", soft_wrap=True, markup=False, highlight=False)
    return 0 if same == len(verdicts) else 1
