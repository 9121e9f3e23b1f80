"""Does a world rank the methods as the published tables do?

For the toy world (or synthetic fakes), which never show published numbers beside their
own, this module measures one thing: Spearman's rank correlation between each method's
average in a table of ours and the published average of the same method
(``results/paper/<protocol>.csv``), over the methods that have both.  The averages are
the papers': base-to-novel, the harmonic mean of the average base and novel accuracies
over all 11 datasets; cross-dataset, the mean over the 10 targets; domain
generalisation, the mean over the 4 ImageNet variants.  A method whose table does not
cover every dataset of the published average is left out (its average is another
quantity).  A method whose records of several settings are separate rows of the table
(``benchmark.record_settings.split_settings``: two backbones, say) enters once per row, each row
with the published average of its registered method.  Spearman's rho is the Pearson
correlation of the ranks, ties taking their mean rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

PROTOCOLS = ("base2novel", "cross_dataset", "domain_generalization")
MIN_METHODS = 3  # fewer methods than this give no rank correlation worth printing


@dataclass(frozen=True)
class Agreement:
    protocol: str
    rho: float  # Spearman's rank correlation
    ours: dict[str, float]  # table row (method, or method and setting) -> our average
    published: dict[str, float]  # table row -> the published average of its method

    @property
    def line(self) -> str:
        pairs = ", ".join(f"{m} {self.ours[m]:.2f} / {self.published[m]:.2f}"
                          for m in sorted(self.ours, key=lambda m: -self.published[m]))
        what = {"base2novel": "average HM", "cross_dataset": "10-target average",
                "domain_generalization": "4-variant average"}[self.protocol]
        return (f"Rank agreement with the published {what} ({self.protocol}): Spearman rho = {self.rho:+.2f} "
                f"over {len(self.ours)} methods (ours / published: {pairs}).")


def spearman(x, y) -> float:
    """Spearman's rho of two equally long sequences (ties: mean ranks); nan when a
    sequence is constant or shorter than two."""
    rx, ry = pd.Series(list(x), dtype=float).rank(), pd.Series(list(y), dtype=float).rank()
    if len(rx) != len(ry):
        raise ValueError(f"spearman needs sequences of one length, got {len(rx)} and {len(ry)}.")
    if len(rx) < 2 or rx.nunique() < 2 or ry.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def our_averages(table: pd.DataFrame, protocol: str) -> dict[str, float]:
    """table row (``method``) -> the table's average row where it covers every dataset of the protocol."""
    from datasets.catalog import BASE2NOVEL_DATASETS

    if table is None or table.empty:
        return {}
    rows = table[table["dataset"] == "average"]
    if protocol == "base2novel":
        complete = {m for m, g in table[table["dataset"] != "average"].groupby("method")
                    if set(g["dataset"]) >= set(BASE2NOVEL_DATASETS)}
        return {r.method: float(r.hm) for r in rows.itertuples() if r.method in complete and np.isfinite(r.hm)}
    # cross-dataset / DG: the table's average is nan unless every target is there
    rows = rows[rows["shots"] == rows["shots"].max()] if "shots" in rows else rows
    return {r.method: float(r.accuracy) for r in rows.itertuples() if np.isfinite(r.accuracy)}


def published_averages(paper: pd.DataFrame, protocol: str) -> dict[str, float]:
    """lower-case published method name -> its published average."""
    if paper is None or paper.empty:
        return {}
    if protocol == "base2novel":
        rows, column = paper[paper["dataset"] == "average"], "hm"
    elif protocol == "cross_dataset":
        rows, column = paper[(paper["target_dataset"] == "average") & (paper["source_dataset"] == "imagenet")], "accuracy"
    else:
        rows, column = paper[paper["dataset"] == "average"], "accuracy"
    return {str(m).lower(): float(v) for m, v in zip(rows["method"], rows[column]) if np.isfinite(float(v))}


def rank_agreement(table: pd.DataFrame, paper: pd.DataFrame, protocol: str) -> Agreement | None:
    """Spearman's rho between our and the published averages, or None where fewer than
    ``MIN_METHODS`` methods have both (or the protocol has no published average)."""
    from benchmark.record_settings import method_names
    from methods.registry import paper_name

    if protocol not in PROTOCOLS:
        return None
    ours, published = our_averages(table, protocol), published_averages(paper, protocol)
    names = method_names(table)  # a row's registered method (its label when split into settings)
    both = {m: v for m, v in ours.items() if paper_name(names.get(m, m)).lower() in published}
    if len({names.get(m, m) for m in both}) < MIN_METHODS:  # methods, not settings of one
        return None
    pub = {m: published[paper_name(names.get(m, m)).lower()] for m in both}
    return Agreement(protocol, spearman([both[m] for m in both], [pub[m] for m in both]), both, pub)
