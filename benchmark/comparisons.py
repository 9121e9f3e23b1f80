"""Ordinary tables against a reference method (``--reference METHOD``): each other method's
difference to it, per dataset and on the papers' average, with paired-bootstrap 95%
intervals (``benchmark.bootstrap``).

Only the runs both methods have (same training dataset, shots and seed) are compared, so
the average here is over the datasets both have.  Records without per-image predictions
(made before they were stored) give the difference without an interval, and the table says
so.  Files: ``tables/<table>-vs-<method>.{md,csv}`` beside the table compared.

Rows are those of the ordinary tables: a method (or the reference) whose records differ in
their run identity other than the seed is split into one row per setting
(``benchmark.record_settings.split_settings``), and each row of a method is compared with each row of
the reference separately, never averaged over settings.  A run is paired with the reference's
run of the same dataset, shots and seed on the same backbone (``common_runs``): two backbones
would put the difference between models into the difference between methods, so runs on
different backbones are never compared (a row with no reference run on its backbone is named
in the notes).  Otherwise the two runs may differ in their options, schedule or version: that
is each method's own recipe, so a row is compared with every reference row of its backbone,
and each line names both.  When the reference is split, the ``reference`` column says which of
its rows a line is compared with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from benchmark import bootstrap
from benchmark import records as R
from benchmark.ablations import RECORD_PROTOCOL, TITLES, common_runs, row_cells
from benchmark.record_settings import split_settings
from benchmark.tables import records_frame

PAIRING_NOTE = ("Rows split into settings are compared each on its own, with every row of the reference on the "
                "same backbone.")
NOTE = ("Δ: the method minus the reference method, per dataset and on the average (over the datasets both have), "
        "with a paired-bootstrap 95% interval over test images and seeds ({} resamples, fixed seed); an interval "
        "containing 0 means the difference is within the noise of test sampling and seeds.")


def _cells(protocol: str, records: Sequence[dict]) -> pd.DataFrame:
    frame = records_frame(records)
    frame = frame[frame["split"].map(bootstrap.evaluation_names(protocol))]
    return pd.DataFrame(row_cells(protocol, frame)) if not frame.empty else pd.DataFrame()


def compare_with(output, protocol: str, world: str, records: Sequence[dict], reference: str) -> pd.DataFrame:
    """Long frame: method, shots, dataset, metric, value, reference_value, delta, low, high,
    note; ``method`` is the row of the ordinary table (the method, and its setting where its
    records are split), and a ``reference`` column (the reference's row) is added where the
    reference is split into settings.  ``attrs``: ``settings_notes`` (what split which method)
    and ``unpaired`` (rows whose runs match the reference's only on another backbone)."""
    own = [r for r in records if R.is_finished_record(r) and R.in_plain_tables(r)
           and r.get("world", "real") == world and r["protocol"] == RECORD_PROTOCOL.get(protocol, protocol)]
    settings = split_settings(own)  # the rows of the ordinary table
    rows = []
    groups: dict[tuple, list[dict]] = {}
    names: dict[str, str] = {}  # row label -> registered method
    for r in own:
        label = settings.row(r)[0]
        names[label] = r["method"]
        groups.setdefault((label, r["shots"]), []).append(r)
    references = [key for key in groups if names[key[0]] == reference]
    compared, elsewhere = set(), set()  # rows compared; rows with reference runs on other backbones only
    for (method, shots), recs in groups.items():
        if names[method] == reference:
            continue
        for ref_label, ref_shots in references:
            if ref_shots != shots:
                continue
            ref = groups[(ref_label, ref_shots)]
            mine, theirs = common_runs(recs, ref), common_runs(ref, recs)
            if not mine:  # no run of the reference on this row's backbone
                if {(r["dataset"], r["seed"]) for r in recs} & {(r["dataset"], r["seed"]) for r in ref}:
                    elsewhere.add((method, shots))
                continue
            compared.add((method, shots))
            a, b = _cells(protocol, mine), _cells(protocol, theirs)
            if a.empty or b.empty:
                continue
            intervals, why = bootstrap.compare_rows(output, protocol, mine, theirs)
            merged = a.merge(b[["dataset", "metric", "value"]].rename(columns={"value": "reference_value"}),
                             on=["dataset", "metric"], how="inner")
            for c in merged.itertuples(index=False):
                found = (intervals or {}).get((c.dataset, c.metric))
                rows.append({"method": method, "reference": ref_label, "shots": shots, "dataset": c.dataset,
                             "metric": c.metric, "value": c.value, "reference_value": c.reference_value,
                             "delta": found.delta if found else c.value - c.reference_value,
                             "low": found.low if found else np.nan, "high": found.high if found else np.nan,
                             "note": "" if found else why})
    columns = ["method", "shots", "dataset", "metric", "value", "reference_value", "delta", "low", "high", "note"]
    if any(label != reference for label, _ in references):  # the reference is split: say which row
        columns.insert(1, "reference")
    frame = pd.DataFrame(rows, columns=columns)
    shown = {names[m] for m in frame["method"]} | ({reference} if len(frame) else set())
    frame.attrs["settings_notes"] = settings.notes_for(world, RECORD_PROTOCOL.get(protocol, protocol), shown)
    frame.attrs["unpaired"] = [f"{method} ({shots} shots): no run of {reference} on its backbone, not compared."
                               for method, shots in sorted(elsewhere - compared)]
    return frame


def display(frame: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One line per method (row), reference row where the reference is split, shots and
    dataset: 'Δ [low, high]' per metric."""
    lines = []
    split = "reference" in frame.columns
    keys = ["method", "reference", "shots", "dataset"] if split else ["method", "shots", "dataset"]
    for values, group in frame.groupby(keys, sort=False):
        found = dict(zip(keys, values))
        line = {"Method": found["method"], **({"Reference": found["reference"]} if split else {}),
                "Shots": int(found["shots"]), "Dataset": found["dataset"]}
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
            if frame.attrs.get("settings_notes"):
                notes += list(frame.attrs["settings_notes"]) + [PAIRING_NOTE]
            notes += list(frame.attrs.get("unpaired", []))
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
