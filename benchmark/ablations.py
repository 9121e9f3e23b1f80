"""Ablation tables: one row per grid point of a ``--grid`` sweep, and a plot per protocol.

Which records: those of a protocol (and world) that carry a grid point, and every record
that is the same run but for the grid's keys (a run made without ``--grid`` is the grid
point of its own values: the official value joins the table without running again).  A
record's point is read from its resolved config.

Each row averages as the papers do, through ``benchmark.tables``: base-to-novel Base and
Novel over the datasets, HM of those averages; cross-dataset over the targets (ImageNet,
the source, shown apart), domain generalisation over the ImageNet variants, few-shot over
the datasets, per shot count.  Only the datasets every row of a method has are averaged,
so rows compare like with like.  A row holds records of one setting: records of one method
and grid point that differ in anything else of their run identity (two backbones, another
``--opts`` value) are separate rows, labelled as in the other tables
(``benchmark.record_settings.split_settings``), each compared with the reference row of its own
setting.  Every cell carries the standard deviation over seeds
(population, as the other tables): of the per-seed averages in the average row, of the
per-seed HM for HM.  With a reference point (``--reference KEY=VALUE``), each row shows
its difference to the reference row (the row with the reference's values and the same
other keys) with a paired-bootstrap 95% interval (``benchmark.bootstrap``).

Files: ``tables/ablation-<protocol>.{md,csv}`` (``-toy``/``-synthetic`` for those worlds,
as every table) and ``plots/ablation-<protocol>.png``: each metric against each key's
values, one line per value of the other keys, seed std as error bars.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from benchmark import bootstrap, record_settings
from benchmark import records as R
from benchmark import tables
from benchmark.grid import Reference, point_label, shown, value_at

METRICS = {"base2novel": ("base", "novel", "hm")}
TITLES = {"base": "Base", "novel": "Novel", "hm": "HM", "accuracy": "Accuracy"}
RECORD_PROTOCOL = {"cross_dataset": "transfer", "domain_generalization": "transfer"}


@dataclass
class Ablation:
    """One ablation table: its long frame (the CSV), what people read (markdown), notes."""

    protocol: str
    world: str
    name: str
    keys: list[str]
    cells: pd.DataFrame  # method, shots, <keys>, point, dataset, metric, value, std, seeds, delta, low, high
    shown: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)  # the records in it


def _config_value(record: dict, key: str):
    """A record's value of a grid key; an option added after the record was made has, in
    it, the value that reproduces it (``register_method(neutral=...)``)."""
    try:
        return value_at(record["config"], key)
    except (KeyError, TypeError):
        from methods.registry import get_method

        return get_method(record["method"]).neutral.get(key.rsplit(".", 1)[-1])


def _family(record: dict, keys: Sequence[str]) -> str:
    """Records equal in everything that makes a run but the grid keys share a family."""
    from benchmark.protocols import identity_config

    config = identity_config(record.get("config", {}), record["method"], drop=keys)
    payload = {k: record.get(k) for k in ("method", "method_version", "protocol", "stage", "dataset", "shots",
                                          "seed", "subsample", "backbone_id", "world")}
    text = json.dumps({**payload, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def ablation_records(records: Sequence[dict], protocol: str, world: str) -> tuple[list[str], list[dict]]:
    """(grid keys, records of the ablation) of a protocol and world; ([], []) without grid runs."""
    own = [r for r in records if R.is_finished_record(r) and r.get("world", "real") == world
           and r["protocol"] == RECORD_PROTOCOL.get(protocol, protocol)]
    gridded = [r for r in own if r.get("grid")]
    keys = list(dict.fromkeys(k for r in gridded for k in r["grid"]))
    if not keys:
        return [], []
    families = {_family(r, keys) for r in gridded}
    return keys, [r for r in own if r.get("grid") or _family(r, keys) in families]


def _seed_std(wide: pd.DataFrame, columns: Sequence[str], combine=None) -> dict[str, float]:
    """Population std over seeds of per-seed averages over the datasets (rows: dataset, seed),
    over the seeds every dataset has; ``combine`` adds derived columns (HM) per seed."""
    seeds = set.intersection(*(set(g["seed"]) for _, g in wide.groupby("dataset"))) if len(wide) else set()
    per_seed = wide[wide["seed"].isin(seeds)].groupby("seed")[list(columns)].mean()
    if combine is not None:
        per_seed = combine(per_seed)
    return {c: float(per_seed[c].std(ddof=0)) if len(per_seed) else np.nan for c in per_seed.columns}


def _hm_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(hm=bootstrap.harmonic_mean(frame["base"], frame["novel"]))


def row_cells(protocol: str, frame: pd.DataFrame) -> list[dict]:
    """Cells (dataset, metric, value, std, seeds) of one row's frame, ``average`` included."""
    cells = []
    if protocol == "base2novel":
        table = tables.base2novel_table(frame, dataset_order=sorted(frame["dataset"].unique()))
        wide = frame.pivot_table(index=["dataset", "seed"], columns="split", values="accuracy",
                                 aggfunc="first").reset_index()
        for split in ("base", "novel"):
            if split not in wide:
                wide[split] = np.nan
        for row in table.itertuples(index=False):
            part = wide if row.dataset == "average" else wide[wide["dataset"] == row.dataset]
            std = _seed_std(part, ["base", "novel"], _hm_frame)
            for metric in ("base", "novel", "hm"):
                cells.append({"dataset": row.dataset, "metric": metric, "value": getattr(row, metric),
                              "std": std[metric], "seeds": int(row.seeds)})
        return cells
    table = tables.accuracy_table(frame, protocol)
    frame = frame.assign(dataset=frame["split"]) if protocol != "few_shot" else frame
    averaged = [d for d in table["dataset"] if d != "average" and bootstrap.averaged_in(protocol, d)]
    for row in table[table["dataset"] != "average"].itertuples(index=False):
        cells.append({"dataset": row.dataset, "metric": "accuracy", "value": row.accuracy, "std": row.std,
                      "seeds": int(row.seeds)})
    if averaged:  # the papers' average, over the targets (datasets) this table has
        part = frame[frame["dataset"].isin(averaged)].rename(columns={"accuracy": "acc"})
        cells.append({"dataset": "average", "metric": "accuracy",
                      "value": float(table.set_index("dataset").loc[averaged, "accuracy"].mean()),
                      "std": _seed_std(part, ["acc"])["acc"], "seeds": int(table["seeds"].min())})
    return cells


def ablation_table(output, protocol: str, world: str, records: Sequence[dict],
                   reference: Reference | None = None) -> Ablation | None:
    keys, chosen = ablation_records(records, protocol, world)
    if not chosen:
        return None
    name = f"ablation-{protocol}" + ("" if world == "real" else f"-{world}")
    # rows of one setting each: the grid keys apart, records that differ in their identity
    # are labelled apart (never averaged or paired with each other)
    settings = record_settings.split_settings(chosen, drop=keys,
                                     point=lambda r: tuple(_config_value(r, key) for key in keys))
    notes = settings.notes_for(world, RECORD_PROTOCOL.get(protocol, protocol), {r["method"] for r in chosen})
    groups: dict[tuple, list[dict]] = {}
    names: dict[str, tuple[str, str]] = {}  # row label -> (registered method, setting)
    for record in chosen:
        point = tuple(_config_value(record, key) for key in keys)
        label, setting = settings.row(record)
        names[label] = (record["method"], setting)
        groups.setdefault((label, record["shots"], point), []).append(record)
    groups = dict(sorted(groups.items(), key=lambda item: (item[0][0], item[0][1], _sortable(item[0][2]))))
    wanted = bootstrap.evaluation_names(protocol)
    rows = []
    for method in dict.fromkeys(k[0] for k in groups):  # like with like: datasets every row of the method has
        mine = {k: v for k, v in groups.items() if k[0] == method}
        common = set.intersection(*({r["dataset"] for r in v} for v in mine.values()))
        dropped = set().union(*({r["dataset"] for r in v} for v in mine.values())) - common
        if dropped:
            notes.append(f"{method}: {', '.join(sorted(dropped))} left out (not run at every grid point).")
        for (m, shots, point), recs in mine.items():
            recs = [r for r in recs if r["dataset"] in common]
            frame = tables.records_frame(recs)
            frame = frame[frame["split"].map(wanted)]
            if frame.empty:
                continue
            for c in row_cells(protocol, frame):
                rows.append({"method": m, "method_name": names[m][0], "setting": names[m][1], "shots": shots,
                             **dict(zip(keys, point)), "point": point_label(dict(zip(keys, point))), **c,
                             "_records": recs})
    if not rows:
        return None
    cells = pd.DataFrame(rows)
    if not (cells["setting"] != "").any():  # no method split: the columns as ever
        cells = cells.drop(columns=["method_name", "setting"])
    for column in ("delta", "low", "high"):
        cells[column] = np.nan
    cells["reference"] = False
    if reference is not None and reference.point:
        notes += _add_reference(output, protocol, cells, keys, groups, reference)
    cells = cells.drop(columns="_records")
    return Ablation(protocol, world, name, keys, cells, _display(protocol, cells, keys, reference), notes,
                    {r["id"] for r in chosen})


def _add_reference(output, protocol: str, cells: pd.DataFrame, keys: list[str], groups: dict,
                   reference: Reference) -> list[str]:
    """Fill delta/low/high of every row against its reference row; returns notes."""
    notes, done = set(), {}
    for i, row in cells.iterrows():
        point = tuple(reference.point.get(k, row[k]) for k in keys)
        own = tuple(row[k] for k in keys)
        ref = (row["method"], row["shots"], point)
        if ref not in groups:
            notes.add(f"no row with the reference {point_label(dict(zip(keys, point)))} for some rows.")
            continue
        if point == own:
            cells.loc[i, "reference"] = True
            continue
        pair = (row["method"], row["shots"], own)
        if pair not in done:
            done[pair] = bootstrap.compare_rows(output, protocol, common_runs(row["_records"], groups[ref]),
                                                common_runs(groups[ref], row["_records"]))
        intervals, why = done[pair]
        if intervals is None:
            notes.add(why + ".")
            ref_row = cells[(cells["method"] == row["method"]) & (cells["shots"] == row["shots"])
                            & (cells["dataset"] == row["dataset"]) & (cells["metric"] == row["metric"])
                            & (cells["point"] == point_label(dict(zip(keys, point))))]
            if len(ref_row):
                cells.loc[i, "delta"] = row["value"] - ref_row["value"].iloc[0]
            continue
        found = intervals.get((row["dataset"], row["metric"]))
        if found is not None:
            cells.loc[i, ["delta", "low", "high"]] = [found.delta, found.low, found.high]
    return sorted(notes)


def _sortable(point: tuple) -> tuple:
    return tuple((isinstance(v, str), v if not isinstance(v, str) else 0, str(v)) for v in point)


def common_runs(records: list[dict], other: list[dict]) -> list[dict]:
    """The records with a run of the same dataset and seed in ``other`` on the same backbone
    (the two rows of a difference adapt the same model; a record made before ``backbone_id``
    was stored pairs with either)."""
    have: dict[tuple, set] = {}
    for r in other:
        have.setdefault((r["dataset"], r["seed"]), set()).add(r.get("backbone_id"))

    def paired(r) -> bool:
        ids = have.get((r["dataset"], r["seed"]))
        return ids is not None and (r.get("backbone_id") is None or None in ids or r.get("backbone_id") in ids)

    return [r for r in records if paired(r)]


def _display(protocol: str, cells: pd.DataFrame, keys: list[str], reference: Reference | None) -> pd.DataFrame:
    """One line per (method, shots, point): the average cells as 'mean ± std', seeds, and the
    difference to the reference with its interval."""
    metrics = list(dict.fromkeys(cells["metric"]))
    columns = [("average", m) for m in metrics]
    if protocol == "cross_dataset":
        columns = [("imagenet", "accuracy")] + columns
    out = []
    for (method, shots, _point), group in cells.groupby(["method", "shots", "point"], sort=False):
        line = {"Method": method}
        if protocol in ("few_shot",) or cells["shots"].nunique() > 1:
            line["Shots"] = int(shots)
        first = group.iloc[0]
        line.update({k.rsplit(".", 1)[-1]: shown(first[k]) for k in keys})
        by = group.set_index(["dataset", "metric"])
        for dataset, metric in columns:
            title = "ImageNet" if dataset == "imagenet" else TITLES[metric] if protocol == "base2novel" else "Average"
            line[title] = tables.cell(*by.loc[(dataset, metric), ["value", "std"]]) if (dataset, metric) in by.index \
                else "-"
        line["Seeds"] = str(int(group["seeds"].min()))
        if reference is not None and reference.point:
            for dataset, metric in columns:
                title = "ImageNet" if dataset == "imagenet" else TITLES[metric] if protocol == "base2novel" else "Average"
                c = by.loc[(dataset, metric)] if (dataset, metric) in by.index else None
                line[f"Δ{title} [95% CI]"] = _delta_text(c)
        out.append(line)
    return pd.DataFrame(out)


def _delta_text(c) -> str:
    if c is not None and c["reference"]:
        return "reference"
    if c is None or pd.isna(c["delta"]):
        return "-"
    if pd.isna(c["low"]):
        return f"{c['delta']:+.2f} (no interval)"
    return bootstrap.Interval(c["delta"], c["low"], c["high"]).text()


NOTE = ("One row per grid point. Cells: mean ± std (population) over seeds; the average as the papers take it "
        "(base-to-novel: Base and Novel averaged over the datasets, HM of those averages; cross-dataset: the "
        "targets, ImageNet apart; domain generalisation: the ImageNet variants; few-shot: the datasets), over "
        "the datasets every row has; its std is that of the per-seed averages (of the per-seed HM for HM). "
        "Per-dataset cells are in the CSV.")
CI_NOTE = ("Δ: this row minus the reference row (the reference's values, the other keys as this row), with a "
           "paired-bootstrap 95% interval over test images and seeds ({} resamples, fixed seed); an interval "
           "containing 0 means the difference is within the noise of test sampling and seeds.")


def all_notes(ablation: Ablation) -> list[str]:
    with_ci = any(str(c).startswith("Δ") for c in ablation.shown.columns)
    return [NOTE] + ([CI_NOTE.format(bootstrap.RESAMPLES)] if with_ci else []) + ablation.notes


def write_ablation(ablation: Ablation, output, footnote: str = "") -> list[Path]:
    out_dir = Path(output) / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / f"{ablation.name}.csv", out_dir / f"{ablation.name}.md"
    # grid values as written (a float format would round 1e-05 away), measurements to 4 decimals
    ablation.cells.assign(**{k: ablation.cells[k].map(shown) for k in ablation.keys}).to_csv(
        csv, index=False, float_format="%.4f")
    text = f"# {ablation.name}\n\n" + ablation.shown.to_markdown(index=False) + "\n\n" + "\n\n".join(
        all_notes(ablation) + ([footnote] if footnote else [])) + "\n"
    md.write_text(text)
    return [md, csv] + plot_ablation(ablation, Path(output) / "plots")


def plot_ablation(ablation: Ablation, out_dir: Path) -> list[Path]:
    """Each metric (rows) against each grid key's values (columns), one line per method,
    shot count and values of the other keys; error bars: seed std."""
    cells = ablation.cells[ablation.cells["dataset"] == "average"]
    metrics = list(dict.fromkeys(cells["metric"]))
    if cells.empty or cells["value"].isna().all():
        return []
    plt = tables.pyplot()
    keys = ablation.keys
    fig, axes = plt.subplots(len(metrics), len(keys), figsize=(4.2 * len(keys), 2.8 * len(metrics)), dpi=120,
                             squeeze=False)
    for col, key in enumerate(keys):
        values = sorted(cells[key].unique(), key=lambda v: (isinstance(v, str), v))
        x_of = {v: i for i, v in enumerate(values)}
        others = [k for k in keys if k != key]
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            part = cells[cells["metric"] == metric]
            lines = part.groupby(["method", "shots", *others], sort=False)
            for i, (label, line) in enumerate(lines):
                label = label if isinstance(label, tuple) else (label,)
                shift = (i - (lines.ngroups - 1) / 2) * 0.15 / max(lines.ngroups, 1)  # equal lines stay visible
                line = line.assign(_x=line[key].map(x_of) + shift).sort_values("_x")
                name = ", ".join([str(label[0])] + ([f"{label[1]} shots"] if part["shots"].nunique() > 1 else [])
                                 + [f"{k.rsplit('.', 1)[-1]}={shown(v)}" for k, v in zip(others, label[2:])])
                ax.errorbar(line["_x"], line["value"], yerr=line["std"].fillna(0), marker="o", ms=4, capsize=2,
                            color=f"C{i % 10}", label=name)
            ax.set_xticks(range(len(values)), labels=[shown(v) for v in values])
            ax.set_xlabel(key.rsplit(".", 1)[-1])
            ax.set_ylabel(f"{TITLES[metric]} (%)" if ablation.protocol == "base2novel" else "average accuracy (%)")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=6)
    fig.suptitle(ablation.name, fontsize=9)
    return [tables.save_figure(fig, out_dir, f"{ablation.name}.png")]


def build_ablations(output, protocols: Sequence[str], reference: Reference | None = None,
                    run_ids: set[str] | None = None) -> tuple[list[Ablation], list[Path]]:
    """The ablation tables (and plots) of every protocol and world with grid runs under
    ``output``; with ``run_ids`` only those whose grid runs include one of them."""
    from benchmark import store

    scan = store.scan_records(output)
    found, paths = [], []
    worlds = dict.fromkeys(r.get("world", "real") for r in scan.records)
    for protocol in protocols:
        for world in worlds:
            ablation = ablation_table(output, protocol, world, scan.records, reference)
            if ablation is None:
                continue
            paths += write_ablation(ablation, output)
            if run_ids is None or ablation.ids & set(run_ids):
                found.append(ablation)
    return found, paths


def grid_keys(output) -> list[str]:
    """Every grid key of the records under ``output`` (for a reference written with short keys)."""
    from benchmark import store

    return list(dict.fromkeys(k for r in store.iter_records(output) for k in (r.get("grid") or {})))
