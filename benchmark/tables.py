"""Records -> pandas -> paper-shaped tables (markdown, CSV), with published numbers beside ours.

One row holds the records of one computation (``benchmark.record_settings``): records that differ in
their run identity other than the seed (two backbones, two learning rates) are never averaged
together; a method with records of several settings becomes one row per setting
(``zsclip [backbone=RN50]``), the ``method_name`` column keeps the registered name, and a note
under the table says which methods were split and by what.

Base-to-novel conventions (those of the MMA, MaPLe and CoCoOp tables):
* per dataset, Base and Novel are each the mean over seeds; HM = 2BN/(B+N) of those means;
* the Average row averages the per-dataset Base and Novel means over the datasets present
  and takes HM of those two averages (not the mean of per-dataset HMs);
* std is the population standard deviation over seeds (ddof=0), as the official parser;
* a run that failed or is missing is simply absent: a cell with no run shows "-", never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from benchmark import records as R
from benchmark.record_settings import (Settings, method_names, named_frame, settings_notes, split_settings,
                                       with_notes, with_setting_columns)
from methods.registry import paper_name

PAPER_DIR = Path(__file__).resolve().parent.parent / "results" / "paper"


def records_frame(records: Iterable[dict], settings: Settings | None = None) -> pd.DataFrame:
    """One row per (run, evaluation split) of the successful records.  ``method`` is the
    row a record belongs to (``split_settings``; ``settings``: computed over more records,
    by the caller), ``method_name`` its registered method, ``setting`` what sets the row apart."""
    records = [r for r in records if R.is_finished_record(r)]
    settings = split_settings(records) if settings is None else settings
    rows = []
    for rec in records:
        label, setting = settings.row(rec)
        for split, m in R.applicable_metrics(rec):  # not the inapplicable (a linear probe on novel classes)
            rows.append({"world": rec.get("world", "real"), "method": label,
                         "protocol": rec["protocol"], "dataset": rec["dataset"],
                         "shots": rec["shots"], "seed": rec["seed"], "backbone": rec.get("backbone"),
                         "split": split, "accuracy": m["accuracy"], "macro_f1": m.get("macro_f1"),
                         "n_images": m.get("n_images"), "method_name": rec["method"], "setting": setting})
    columns = ["world", "method", "protocol", "dataset", "shots", "seed", "backbone", "split", "accuracy",
               "macro_f1", "n_images", "method_name", "setting"]
    frame = pd.DataFrame(rows, columns=columns)
    frame.attrs["settings_notes"] = dict(settings.notes)  # kept by slices of the frame; read by the tables
    return frame


def _hm(base, novel):
    base, novel = np.asarray(base, dtype=float), np.asarray(novel, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(base + novel > 0, 2 * base * novel / (base + novel), np.nan)


def load_paper(protocol: str, paper_dir: Path = PAPER_DIR) -> pd.DataFrame:
    path = Path(paper_dir) / f"{protocol}.csv"
    if not path.is_file():
        return pd.DataFrame()
    return pd.read_csv(path, dtype={"base": float, "novel": float, "hm": float})


def base2novel_table(frame: pd.DataFrame, dataset_order: list[str] | None = None,
                     paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method and dataset (+ average): base, novel, hm, stds, seeds, published numbers."""
    columns = ["method", "dataset", "base", "base_std", "novel", "novel_std", "hm", "seeds",
               "paper_base", "paper_novel", "paper_hm", "delta_hm"]
    frame = named_frame(frame[frame["protocol"] == "base2novel"])
    if frame.empty:
        return pd.DataFrame(columns=columns)
    wide = frame.pivot_table(index=["method", "dataset", "seed"], columns="split",
                             values="accuracy", aggfunc="first").reset_index()
    for split in ("base", "novel"):
        if split not in wide:
            wide[split] = np.nan
    grouped = wide.groupby(["method", "dataset"])
    per = pd.DataFrame({
        "base": grouped["base"].mean(), "base_std": grouped["base"].std(ddof=0),
        "novel": grouped["novel"].mean(), "novel_std": grouped["novel"].std(ddof=0),
        "seeds": grouped["seed"].nunique(),
    }).reset_index()
    per["hm"] = _hm(per["base"], per["novel"])
    if dataset_order is None:
        from datasets.catalog import BASE2NOVEL_DATASETS

        dataset_order = list(BASE2NOVEL_DATASETS)
    order = {name: i for i, name in enumerate(dataset_order)}
    tables = []
    for method, rows in per.groupby("method", sort=False):
        rows = rows.assign(_o=rows["dataset"].map(lambda d: order.get(d, len(order)))).sort_values("_o")
        avg = {"method": method, "dataset": "average", "base": rows["base"].mean(),
               "novel": rows["novel"].mean(), "base_std": np.nan, "novel_std": np.nan,
               "seeds": int(rows["seeds"].min())}
        avg["hm"] = float(_hm(avg["base"], avg["novel"]))
        tables.append(pd.concat([rows.drop(columns="_o"), pd.DataFrame([avg])], ignore_index=True))
    table = pd.concat(tables, ignore_index=True)
    names = frame.drop_duplicates("method").set_index("method")["method_name"]
    table["paper_method"] = table["method"].map(names).map(paper_name).str.lower()
    table[["paper_base", "paper_novel", "paper_hm"]] = np.nan
    if paper is not None and not paper.empty:
        pub = paper.assign(paper_method=paper["method"].str.lower()).set_index(["paper_method", "dataset"])
        for i, row in table.iterrows():
            if row["dataset"] != "average":
                key = (row["paper_method"], row["dataset"])
                if key in pub.index:
                    table.loc[i, ["paper_base", "paper_novel", "paper_hm"]] = \
                        pub.loc[key, ["base", "novel", "hm"]].to_numpy(dtype=float)
                continue
            shown = table[(table["method"] == row["method"]) & (table["dataset"] != "average")]
            if set(shown["dataset"]) == set(dataset_order) and (row["paper_method"], "average") in pub.index:
                # every dataset of the paper's table: its printed average
                table.loc[i, ["paper_base", "paper_novel", "paper_hm"]] = \
                    pub.loc[(row["paper_method"], "average"), ["base", "novel", "hm"]].to_numpy(dtype=float)
            elif shown["paper_base"].notna().all() and shown["paper_novel"].notna().all():
                # a subset: the published per-dataset numbers averaged over the same datasets
                b, n = shown["paper_base"].mean(), shown["paper_novel"].mean()
                table.loc[i, ["paper_base", "paper_novel", "paper_hm"]] = [b, n, float(_hm(b, n))]
    table["delta_hm"] = table["hm"] - table["paper_hm"]
    return with_notes(with_setting_columns(table, frame, columns), frame, "base2novel")


def cell(mean, std=None) -> str:
    if mean is None or pd.isna(mean):
        return "-"
    if std is None or pd.isna(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: mean ± std, published numbers and the HM difference."""
    out = pd.DataFrame({
        "Method": table["method"], "Dataset": table["dataset"],
        "Base": [cell(m, s) for m, s in zip(table["base"], table["base_std"])],
        "Novel": [cell(m, s) for m, s in zip(table["novel"], table["novel_std"])],
        "HM": [cell(m) for m in table["hm"]],
        "Seeds": table["seeds"].astype("Int64").astype(str),
        "Paper B/N/HM": ["/".join(cell(v) for v in row) if not pd.isna(row[2]) else "-"
                         for row in zip(table["paper_base"], table["paper_novel"], table["paper_hm"])],
        "ΔHM": [f"{d:+.2f}" if not pd.isna(d) else "-" for d in table["delta_hm"]],
    })
    return out


NOTE = ("Base and Novel: mean ± std (population) over seeds; HM = 2·B·N/(B+N) of the seed means. "
        "Average row: mean of the per-dataset Base and Novel means over the datasets shown, "
        "HM of those averages (the MMA/MaPLe convention). Paper: published numbers "
        "(results/paper/base2novel.csv); for an Average over fewer than all datasets, the published "
        "per-dataset numbers averaged over the same datasets. ΔHM = ours − paper. '-' = no run or "
        "no published number.")


def _footnotes(table: pd.DataFrame, footnote: str = "") -> str:
    """The lines under a markdown table after its note: methods split into settings, then ``footnote``."""
    return "".join(f"\n{line}\n" for line in [" ".join(settings_notes(table)), footnote] if line)


def write_tables(table: pd.DataFrame, out_dir: str | Path, name: str = "base2novel",
                 footnote: str = "") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{name}.csv", "markdown": out_dir / f"{name}.md"}
    table.to_csv(paths["csv"], index=False, float_format="%.4f")
    text = f"# {name}\n\n" + display_frame(table).to_markdown(index=False) + f"\n\n{NOTE}\n"
    paths["markdown"].write_text(text + _footnotes(table, footnote))
    return paths


# -- cross-dataset, domain generalisation, few-shot -------------------------------------------
TRANSFER_NOTE = {
    "cross_dataset": ("Trained on ImageNet (all classes, 16 shots), evaluated on the full test sets. "
                      "Cells: mean ± std (population) over seeds; '(n=k)' marks a cell with fewer seeds "
                      "than the others; '-' = no run. Average: mean of the 10 target datasets' means "
                      "(the source, ImageNet, excluded), shown only when every target has a result. "
                      "Paper: results/paper/cross_dataset.csv; Δ = ours − paper."),
    "domain_generalization": ("The cross-dataset ImageNet models (trained once per seed) evaluated on "
                              "ImageNet-V2, -Sketch, -A and -R (A and R: their 200 classes). Cells: mean ± "
                              "std over seeds; '(n=k)' marks fewer seeds; '-' = no run. Average: mean of the "
                              "4 shifted sets (ImageNet excluded), only when all four have a result. Paper: "
                              "results/paper/domain_generalization.csv; Δ = ours − paper."),
    "few_shot": ("All classes, K shots per class, full test set. Cells: mean ± std over seeds; '(n=k)' "
                 "marks fewer seeds; '-' = no run. Average: mean over the 11 datasets' means, only when "
                 "all 11 have a result. Paper: results/paper/few_shot.csv; Δ = ours − paper."),
}


def _seed_cells(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    grouped = frame.groupby(keys)
    return pd.DataFrame({"accuracy": grouped["accuracy"].mean(), "std": grouped["accuracy"].std(ddof=0),
                         "seeds": grouped["seed"].nunique()}).reset_index()


def accuracy_table(frame: pd.DataFrame, protocol: str, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long table for cross_dataset, domain_generalization or few_shot: one row per method,
    shots and dataset (plus "average"), with mean, std, seeds, published number and Δ."""
    from datasets.catalog import BASE2NOVEL_DATASETS, CROSS_DATASET_TARGETS, DG_DATASETS

    columns = ["method", "shots", "dataset", "accuracy", "std", "seeds", "paper", "delta"]
    if protocol == "few_shot":
        part = frame[frame["protocol"] == "few_shot"].assign(target=lambda f: f["dataset"])
        targets, extra = list(BASE2NOVEL_DATASETS), []
    else:
        part = frame[frame["protocol"] == "transfer"].assign(target=lambda f: f["split"])
        targets = list(CROSS_DATASET_TARGETS if protocol == "cross_dataset" else DG_DATASETS)
        extra = ["imagenet"]  # the source, shown but not averaged
        part = part[part["target"].isin(extra + targets)]
    if part.empty:
        return pd.DataFrame(columns=columns)
    part = named_frame(part)
    names = part.drop_duplicates("method").set_index("method")["method_name"]
    cells = _seed_cells(part, ["method", "shots", "target"]).rename(columns={"target": "dataset"})
    order = {name: i for i, name in enumerate(extra + targets)}
    rows = []
    for (method, shots), group in cells.groupby(["method", "shots"], sort=False):
        group = group.assign(_o=group["dataset"].map(lambda d: order.get(d, len(order)))).sort_values("_o")
        rows.append(group.drop(columns="_o"))
        have = group[group["dataset"].isin(targets)]
        complete = set(have["dataset"]) == set(targets)
        rows.append(pd.DataFrame([{"method": method, "shots": shots, "dataset": "average",
                                   "accuracy": have["accuracy"].mean() if complete else np.nan,
                                   "std": np.nan, "seeds": int(have["seeds"].min()) if len(have) else 0}]))
    table = pd.concat(rows, ignore_index=True)
    table["paper"] = np.nan
    if paper is not None and not paper.empty:
        pub = paper.assign(m=paper["method"].str.lower())
        if protocol == "cross_dataset":
            pub = pub.rename(columns={"target_dataset": "key"}).set_index(["m", "key"])["accuracy"]
        elif protocol == "domain_generalization":
            pub = pub.rename(columns={"dataset": "key"}).set_index(["m", "key"])["accuracy"]
        else:
            pub = pub.assign(key=pub["dataset"] + "@" + pub["shots"].astype(str)).set_index(["m", "key"])["accuracy"]
        for i, row in table.iterrows():
            key = row["dataset"] if protocol != "few_shot" else f"{row['dataset']}@{int(row['shots'])}"
            name = paper_name(names.get(row["method"], row["method"])).lower()
            if (name, key) in pub.index:
                table.loc[i, "paper"] = float(pub.loc[(name, key)])
    table["delta"] = table["accuracy"] - table["paper"]
    return with_notes(with_setting_columns(table, part, columns), part, "few_shot" if protocol == "few_shot" else "transfer")


def accuracy_display(table: pd.DataFrame) -> pd.DataFrame:
    """Methods (and shots) as rows, datasets as columns: 'mean ± std', '(n=k)' for fewer
    seeds than the table's most, and the published number with Δ below in the paper rows."""
    if table.empty:
        return pd.DataFrame()
    most = int(table["seeds"].max())
    datasets = list(dict.fromkeys(table["dataset"]))
    rows = []
    for (method, shots), group in table.groupby(["method", "shots"], sort=False):
        cells = group.set_index("dataset")
        ours = {"Method": method, "Shots": int(shots)}
        pub = {"Method": "  paper (Δ)", "Shots": int(shots)}
        for name in datasets:
            if name not in cells.index:
                ours[name], pub[name] = "-", "-"
                continue
            c = cells.loc[name]
            text = cell(c["accuracy"], c["std"])
            if text != "-" and name != "average" and int(c["seeds"]) < most:
                text += f" (n={int(c['seeds'])})"
            ours[name] = text
            pub[name] = "-" if pd.isna(c["paper"]) else (
                f"{c['paper']:.2f} ({c['delta']:+.2f})" if not pd.isna(c["delta"]) else f"{c['paper']:.2f}")
        rows.append(ours)
        if any(v != "-" for k, v in pub.items() if k not in ("Method", "Shots")):
            rows.append(pub)
    return pd.DataFrame(rows)


def write_accuracy_tables(table: pd.DataFrame, out_dir: str | Path, name: str, protocol: str,
                          footnote: str = "") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{name}.csv", "markdown": out_dir / f"{name}.md"}
    table.to_csv(paths["csv"], index=False, float_format="%.4f")
    shown = accuracy_display(table)
    text = f"# {name}\n\n" + (shown.to_markdown(index=False) if not shown.empty else "(no runs)")
    paths["markdown"].write_text(text + f"\n\n{TRANSFER_NOTE[protocol]}\n" + _footnotes(table, footnote))
    return paths


# -- every table of a results folder ------------------------------------------------------------
@dataclass
class TableSet:
    """The tables built from a results folder: {(protocol, world): table} to show, the files
    written, and the damaged records left out (path, reason)."""

    shown: dict = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)
    damaged: list = field(default_factory=list)
    # {(protocol, world): benchmark.agreement.Agreement} for the worlds without published numbers
    agreement: dict = field(default_factory=dict)
    # {(protocol, world): [line]}: the methods whose records of several settings are separate rows
    settings: dict = field(default_factory=dict)

    @property
    def skipped_note(self) -> str:
        if not self.damaged:
            return ""
        return (f"{len(self.damaged)} damaged record(s) skipped (not in these tables): "
                + "; ".join(f"{d.path} ({d.reason})" for d in self.damaged[:3])
                + (" ..." if len(self.damaged) > 3 else "")
                + ". A sweep that reaches their runs moves them to quarantine/ and runs them again.")


def build_tables(output: str | Path, protocols: Sequence[str] = ("base2novel",),
                 run_ids: set[str] | None = None) -> TableSet:
    """Write the tables and plots of every sound record under ``output``, per protocol and
    world (real data, toy world, synthetic fakes: never mixed, and only real data is
    compared with published numbers).  ``shown`` is restricted to ``run_ids`` (all records
    when None); damaged records are skipped and counted, in the result and in the files.
    Rows are split by setting over all the records (``split_settings``), so a table of some
    runs labels its rows as the table of all; ``SettingsError`` when two records cannot be
    told apart."""
    from benchmark import store
    from benchmark.agreement import rank_agreement

    scan = store.scan_records(output)
    result = TableSet(damaged=scan.damaged)
    plain = [r for r in scan.records if R.in_plain_tables(r)]  # grid points: benchmark.ablations
    settings = split_settings(plain)
    frame = records_frame(plain, settings)
    chosen = frame if run_ids is None else records_frame((r for r in plain if r["id"] in run_ids), settings)
    for protocol in protocols:
        paper = load_paper(protocol)
        for world in frame["world"].unique():
            pub = paper if world == "real" else None
            name = protocol if world == "real" else f"{protocol}-{world}"

            def make(part):
                if protocol == "base2novel":
                    return base2novel_table(part, paper=pub)
                return accuracy_table(part, protocol, paper=pub)

            table = make(frame[frame["world"] == world])
            if table.empty:
                continue
            note = result.skipped_note
            if world != "real":  # how its ranking of the methods compares with the papers'
                agreed = rank_agreement(table, paper, protocol)
                if agreed is not None:
                    result.agreement[(protocol, world)] = agreed
                    note = " ".join(filter(None, [agreed.line, note]))
            if protocol == "base2novel":
                written = write_tables(table, Path(output) / "tables", name, note)
            else:
                written = write_accuracy_tables(table, Path(output) / "tables", name, protocol, note)
            result.paths += [written["markdown"], written["csv"]]
            if settings_notes(table):
                result.settings[(protocol, world)] = settings_notes(table)
            plots = Path(output) / "plots"
            if protocol == "few_shot":
                result.paths += few_shot_plots(table, plots, name)
            if protocol == "base2novel":
                result.paths += base2novel_plots(table, plots, name)
            result.paths += delta_plot(table, plots, name, protocol)  # real data only: published numbers
            part = chosen[chosen["world"] == world]
            if not part.empty:
                mine = table if run_ids is None else make(part)
                if not mine.empty:
                    result.shown[(protocol, world)] = mine
    return result


def few_shot_plots(table: pd.DataFrame, out_dir: str | Path, name: str = "few_shot") -> list[Path]:
    """One PNG per dataset (and the average): accuracy against shots, one line per method,
    the published curve dashed in the same colour where there is one."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset, group in table.groupby("dataset", sort=False):
        if group["accuracy"].notna().sum() == 0:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=120)
        for i, (method, rows) in enumerate(group.groupby("method", sort=False)):
            rows = rows.sort_values("shots")
            color = f"C{i % 10}"
            ax.errorbar(rows["shots"], rows["accuracy"], yerr=rows["std"].fillna(0), marker="o", ms=4,
                        color=color, label=method, capsize=2)
            if rows["paper"].notna().any():
                ax.plot(rows["shots"], rows["paper"], ls="--", color=color, alpha=0.6, label=f"{method} (paper)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out_dir, f"{name}-{dataset}.png"))
    return paths


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: str | Path, filename: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    path = out_dir / filename
    fig.savefig(path)
    pyplot().close(fig)
    return path


def base2novel_plots(table: pd.DataFrame, out_dir: str | Path, name: str = "base2novel") -> list[Path]:
    """``<name>-bars.png``: Base, Novel and HM per dataset (and the average), one bar per
    method, the published HM as a black tick above each bar where there is one."""
    if table.empty or table[["base", "novel"]].isna().all().all():
        return []
    plt = pyplot()
    datasets = list(dict.fromkeys(table["dataset"]))
    methods = list(dict.fromkeys(table["method"]))
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.75 * len(datasets) * max(1, len(methods)) ** 0.5 + 2), 7.5),
                             dpi=120, sharex=True)
    for ax, column, title in zip(axes, ("base", "novel", "hm"), ("Base", "Novel", "HM")):
        for i, method in enumerate(methods):
            rows = table[table["method"] == method].set_index("dataset").reindex(datasets)
            x = np.arange(len(datasets)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, rows[column].to_numpy(dtype=float), width, color=f"C{i % 10}", label=method)
            paper = rows[f"paper_{column}"].to_numpy(dtype=float)
            if np.isfinite(paper).any():
                ax.scatter(x, paper, marker="_", s=120, color="black", zorder=3,
                           label="published" if i == 0 else None)
        ax.set_ylabel(f"{title} (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=min(len(methods) + 1, 6), loc="lower left")
    axes[-1].set_xticks(np.arange(len(datasets)), labels=datasets, rotation=35, ha="right", fontsize=8)
    return [save_figure(fig, out_dir, f"{name}-bars.png")]


def delta_plot(table: pd.DataFrame, out_dir: str | Path, name: str, protocol: str) -> list[Path]:
    """``<name>-delta.png``: ours minus the published number per dataset and method (HM for
    base-to-novel; accuracy otherwise, at 16 shots for few-shot).  Nothing when no
    published number matches (the toy world and synthetic data have none)."""
    if protocol == "base2novel":
        frame = table.assign(delta=table["hm"] - table["paper_hm"])
        label = "HM - published HM"
    else:
        frame = table if protocol != "few_shot" else table[table["shots"] == table["shots"].max()]
        frame = frame.assign(delta=frame["accuracy"] - frame["paper"])
        label = "accuracy - published" + (f" ({int(frame['shots'].max())} shots)" if protocol == "few_shot" else "")
    frame = frame[frame["delta"].notna()]
    if frame.empty:
        return []
    plt = pyplot()
    datasets = list(dict.fromkeys(frame["dataset"]))
    methods = list(dict.fromkeys(frame["method"]))
    height = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.35 * len(datasets) * max(1, len(methods)) ** 0.5), dpi=120)
    for i, method in enumerate(methods):
        rows = frame[frame["method"] == method].set_index("dataset").reindex(datasets)
        y = np.arange(len(datasets)) + (i - (len(methods) - 1) / 2) * height
        ax.barh(y, rows["delta"].to_numpy(dtype=float), height, color=f"C{i % 10}", label=method)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(np.arange(len(datasets)), labels=datasets, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    return [save_figure(fig, out_dir, f"{name}-delta.png")]


def latex_table(shown: pd.DataFrame, caption: str = "") -> str:
    """A display frame as a LaTeX tabular (booktabs).  Our best mean is set in bold among
    the methods compared on the same thing: per dataset in a base-to-novel frame (Base,
    Novel, HM), per shot count in an accuracy frame (each dataset column).  Published
    numbers (paper columns and rows) and differences (Δ) are never bold."""
    frame = shown.copy()
    if frame.empty:
        return frame.style.hide(axis="index").to_latex(hrules=True, caption=caption or None)
    ours = ~frame["Method"].astype(str).str.strip().str.startswith("paper")
    group_by = "Dataset" if "Dataset" in frame.columns else "Shots" if "Shots" in frame.columns else None
    groups = frame[group_by] if group_by else pd.Series(0, index=frame.index)
    measured = [c for c in frame.columns if c not in ("Method", "Dataset", "Shots", "Seeds")
                and not str(c).lower().startswith("paper") and "Δ" not in str(c)]
    for column in measured:
        values = pd.to_numeric(frame[column].astype(str).str.extract(r"^([-\d.]+)")[0], errors="coerce")
        text = frame[column].astype(str)
        for index in frame[ours].groupby(groups[ours], sort=False).groups.values():
            compared = values.loc[index].dropna()
            if len(compared) < 2:
                continue  # nothing to compare with
            for row in compared.index[compared == compared.max()]:
                text.loc[row] = f"\\textbf{{{text.loc[row]}}}"
        frame[column] = text
    frame = frame.map(lambda v: str(v).replace("±", "$\\pm$").replace("Δ", "$\\Delta$").replace("_", "\\_"))
    frame.columns = [str(c).replace("_", "\\_").replace("Δ", "$\\Delta$") for c in frame.columns]
    return frame.style.hide(axis="index").to_latex(hrules=True, caption=caption or None)


def compute_table(records: Iterable[dict]) -> pd.DataFrame:
    """Per method (row label, as the tables), protocol and dataset: trainable parameters, peak
    memory, wall time, device (means over the successful runs)."""
    records = [r for r in records if R.is_finished_record(r)]
    settings = split_settings(records)  # one row per setting: two backbones' memory are not one number
    rows = []
    for rec in records:
        comp, timing = rec.get("compute", {}), rec.get("timings", {})
        peak = comp.get("peak_memory_bytes")
        rows.append({"method": settings.row(rec)[0], "protocol": rec["protocol"], "dataset": rec["dataset"],
                     "shots": rec["shots"], "trainable_params": comp.get("trainable_params"),
                     "peak_memory_mib": peak / 2**20 if peak else np.nan,
                     "train_s": timing.get("train_s"), "total_s": timing.get("total_s"),
                     "device": comp.get("device"), "precision": comp.get("precision")})
    columns = ["method", "protocol", "dataset", "shots", "runs", "trainable_params", "peak_memory_mib",
               "train_s", "total_s", "device", "precision"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["method", "protocol", "dataset", "shots"], sort=True)
    out = grouped.agg(runs=("train_s", "size"), trainable_params=("trainable_params", "max"),
                      peak_memory_mib=("peak_memory_mib", "max"), train_s=("train_s", "mean"),
                      total_s=("total_s", "mean"), device=("device", "first"),
                      precision=("precision", "first")).reset_index()
    return out[columns]
