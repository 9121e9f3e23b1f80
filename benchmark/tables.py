"""Records -> pandas -> paper-shaped tables (markdown, CSV), with published numbers beside ours.

Base-to-novel conventions (those of the MMA, MaPLe and CoCoOp tables):
* per dataset, Base and Novel are each the mean over seeds; HM = 2BN/(B+N) of those means;
* the Average row averages the per-dataset Base and Novel means over the datasets present
  and takes HM of those two averages (not the mean of per-dataset HMs);
* std is the population standard deviation over seeds (ddof=0), as the official parser;
* a run that failed or is missing is simply absent: a cell with no run shows "-", never 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

PAPER_DIR = Path(__file__).resolve().parent.parent / "results" / "paper"


def records_frame(records: Iterable[dict]) -> pd.DataFrame:
    """One row per (run, evaluation split) of the successful records."""
    rows = []
    for rec in records:
        if rec.get("status") != "ok":
            continue
        for split, m in rec.get("metrics", {}).items():
            if m.get("accuracy") is None:  # not applicable (e.g. a linear probe on novel classes)
                continue
            rows.append({"world": rec.get("world", "real"), "method": rec["method"],
                         "protocol": rec["protocol"], "dataset": rec["dataset"],
                         "shots": rec["shots"], "seed": rec["seed"], "backbone": rec.get("backbone"),
                         "split": split, "accuracy": m["accuracy"], "macro_f1": m.get("macro_f1"),
                         "n_images": m.get("n_images")})
    columns = ["world", "method", "protocol", "dataset", "shots", "seed", "backbone", "split", "accuracy",
               "macro_f1", "n_images"]
    return pd.DataFrame(rows, columns=columns)


def _hm(base, novel):
    base, novel = np.asarray(base, dtype=float), np.asarray(novel, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(base + novel > 0, 2 * base * novel / (base + novel), np.nan)


def paper_name(method: str) -> str:
    from methods.registry import get_method

    try:
        return get_method(method).paper_name
    except ValueError:
        return method


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
    frame = frame[frame["protocol"] == "base2novel"]
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
    table["paper_method"] = table["method"].map(paper_name).str.lower()
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
    return table[columns]


def _cell(mean, std=None) -> str:
    if mean is None or pd.isna(mean):
        return "-"
    if std is None or pd.isna(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: mean ± std, published numbers and the HM difference."""
    out = pd.DataFrame({
        "Method": table["method"], "Dataset": table["dataset"],
        "Base": [_cell(m, s) for m, s in zip(table["base"], table["base_std"])],
        "Novel": [_cell(m, s) for m, s in zip(table["novel"], table["novel_std"])],
        "HM": [_cell(m) for m in table["hm"]],
        "Seeds": table["seeds"].astype("Int64").astype(str),
        "Paper B/N/HM": ["/".join(_cell(v) for v in row) if not pd.isna(row[2]) else "-"
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


def write_tables(table: pd.DataFrame, out_dir: str | Path, name: str = "base2novel") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{name}.csv", "markdown": out_dir / f"{name}.md"}
    table.to_csv(paths["csv"], index=False, float_format="%.4f")
    text = f"# {name}\n\n" + display_frame(table).to_markdown(index=False) + f"\n\n{NOTE}\n"
    paths["markdown"].write_text(text)
    return paths
