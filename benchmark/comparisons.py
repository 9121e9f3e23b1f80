"""Ordinary tables against a reference method (``--reference METHOD``): each other method's
difference to it, per dataset and on the papers' average, with paired-bootstrap 95%
intervals (``benchmark.bootstrap``).

Only the runs both methods have (same training dataset, shots and seed) are compared, so
the average here is over the datasets both have.  Records without per-image predictions
(made before they were stored) give the difference without an interval, and the table says
so.  Files: ``tables/<table>-vs-<method>.{md,csv}`` beside the table compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from benchmark import bootstrap
from benchmark import records as R
from benchmark.ablations import RECORD_PROTOCOL, TITLES, common_runs, row_cells
from benchmark.tables import records_frame

NOTE = ("Δ: the method minus the reference method, per dataset and on the average (over the datasets both have), "
        "with a paired-bootstrap 95% interval over test images and seeds ({} resamples, fixed seed); an interval "
        "containing 0 means the difference is within the noise of test sampling and seeds.")


def _cells(protocol: str, records: Sequence[dict]) -> pd.DataFrame:
    frame = records_frame(records)
    frame = frame[frame["split"].map(bootstrap.evaluation_names(protocol))]
    return pd.DataFrame(row_cells(protocol, frame)) if not frame.empty else pd.DataFrame()


def compare_with(output, protocol: str, world: str, records: Sequence[dict], reference: str) -> pd.DataFrame:
    """Long frame: method, shots, dataset, metric, value, reference_value, delta, low, high, note."""
    own = [r for r in records if R.is_finished_record(r) and R.in_plain_tables(r)
           and r.get("world", "real") == world and r["protocol"] == RECORD_PROTOCOL.get(protocol, protocol)]
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in own:
        groups.setdefault((r["method"], r["shots"]), []).append(r)
    for (method, shots), recs in groups.items():
        ref = groups.get((reference, shots))
        if method == reference or not ref:
            continue
        mine, theirs = common_runs(recs, ref), common_runs(ref, recs)
        if not mine:
            continue
        a, b = _cells(protocol, mine), _cells(protocol, theirs)
        if a.empty or b.empty:
            continue
        intervals, why = bootstrap.compare_rows(output, protocol, mine, theirs)
        merged = a.merge(b[["dataset", "metric", "value"]].rename(columns={"value": "reference_value"}),
                         on=["dataset", "metric"], how="inner")
        for c in merged.itertuples(index=False):
            found = (intervals or {}).get((c.dataset, c.metric))
            rows.append({"method": method, "shots": shots, "dataset": c.dataset, "metric": c.metric,
                         "value": c.value, "reference_value": c.reference_value,
                         "delta": found.delta if found else c.value - c.reference_value,
                         "low": found.low if found else np.nan, "high": found.high if found else np.nan,
                         "note": "" if found else why})
    return pd.DataFrame(rows, columns=["method", "shots", "dataset", "metric", "value", "reference_value",
                                       "delta", "low", "high", "note"])


def display(frame: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One line per method, shots and dataset: 'Δ [low, high]' per metric."""
    lines = []
    for (method, shots, dataset), group in frame.groupby(["method", "shots", "dataset"], sort=False):
        line = {"Method": method, "Shots": int(shots), "Dataset": dataset}
        for c in group.itertuples(index=False):
            title = TITLES[c.metric] if protocol == "base2novel" else "Accuracy"
            line[f"Δ{title} [95% CI]"] = (bootstrap.Interval(c.delta, c.low, c.high).text() if not pd.isna(c.low)
                                          else "-" if pd.isna(c.delta) else f"{c.delta:+.2f} (no interval)")
        lines.append(line)
    out = pd.DataFrame(lines)
    if not out.empty and out["Shots"].nunique() == 1 and protocol != "few_shot":
        out = out.drop(columns="Shots")
    return out


def build_comparisons(output, protocols: Sequence[str], reference: str,
                      run_ids: set[str] | None = None) -> tuple[list[tuple[str, pd.DataFrame, str]], list[Path]]:
    """[(title, display frame, notes)] and the files written, per protocol and world."""
    from benchmark import store

    scan = store.scan_records(output)
    shown, paths = [], []
    worlds = dict.fromkeys(r.get("world", "real") for r in scan.records)
    for protocol in protocols:
        for world in worlds:
            frame = compare_with(output, protocol, world, scan.records, reference)
            if frame.empty:
                continue
            name = (protocol if world == "real" else f"{protocol}-{world}") + f"-vs-{reference}"
            notes = [NOTE.format(bootstrap.RESAMPLES)] + sorted({n + "." for n in frame["note"] if n})
            out_dir = Path(output) / "tables"
            out_dir.mkdir(parents=True, exist_ok=True)
            frame.to_csv(out_dir / f"{name}.csv", index=False, float_format="%.4f")
            text = display(frame, protocol)
            (out_dir / f"{name}.md").write_text(f"# {name}\n\n" + text.to_markdown(index=False) + "\n\n"
                                                + "\n\n".join(notes) + "\n")
            paths += [out_dir / f"{name}.md", out_dir / f"{name}.csv"]
            if run_ids is None or any(r["id"] in run_ids for r in scan.records if r["method"] != reference):
                shown.append((name, text, " ".join(notes)))
    return shown, paths
