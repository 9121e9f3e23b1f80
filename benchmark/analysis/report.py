"""The dataset-level analysis's outputs: the CSV of every row, a markdown table of mean ±
std over seeds per layer, and a figure drawn like the MMA paper's Figure 1 (accuracy
against layer, one line per tower with a band of ± one std, one panel per backbone)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.analysis.layers import EMBED, PROJ
from benchmark.files import write_atomic, write_bytes_atomic

NOTE = ("Accuracy: balanced dataset-recognition accuracy (%) of a linear classifier on one layer's features, "
        "mean ± std (population) over seeds; chance is 100 / datasets. Gap: 1 − linear CKA between image "
        "features and the text features of their classes at the same layer; '—' where it is undefined (at X_Embed "
        "the image class token is one learned vector for every image, so its accuracy is chance by construction).")


def _order(layer: str, depth: int) -> int:
    return 0 if layer == EMBED else depth + 1 if layer == PROJ else int(layer)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per backbone and layer: mean and std over seeds of each tower's accuracy and of the gap."""
    rows = []
    for backbone, part in frame.groupby("backbone", sort=False):
        depth = max(int(v) for v in part["layer"] if v not in (EMBED, PROJ))
        for layer in sorted(part["layer"].unique(), key=lambda v: _order(v, depth)):
            at = part[part["layer"] == layer]
            row = {"backbone": backbone, "layer": layer, "position": _order(layer, depth)}
            for tower in ("text", "image"):
                values = at.loc[at["tower"] == tower, "accuracy"]
                row[tower], row[f"{tower}_std"] = values.mean(), values.std(ddof=0)
            gaps = at.drop_duplicates("seed")["gap"]
            row["difference"] = row["text"] - row["image"]
            row["gap"], row["gap_std"] = gaps.mean(), gaps.std(ddof=0)
            row["seeds"] = int(at["seed"].nunique())
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float, digits: int = 1) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(frame: pd.DataFrame) -> str:
    """The table per backbone, as markdown, with the note on what the cells are."""
    table = summary(frame)
    parts = ["# Dataset-level recognition accuracy per layer (MMA Figure 1, reconstructed)\n"]
    for backbone, part in table.groupby("backbone", sort=False):
        datasets = int(frame.loc[frame["backbone"] == backbone, "datasets"].iloc[0])
        shown = pd.DataFrame({
            "layer": part["layer"],
            "text": [_cell(m, s) for m, s in zip(part["text"], part["text_std"])],
            "image": [_cell(m, s) for m, s in zip(part["image"], part["image_std"])],
            "text − image": [f"{v:+.1f}" if not pd.isna(v) else "—" for v in part["difference"]],
            "gap (1 − CKA)": [_cell(m, s, 3) for m, s in zip(part["gap"], part["gap_std"])],
        })
        parts.append(f"## {backbone} ({datasets} datasets, {int(part['seeds'].max())} seeds, chance "
                     f"{100 / datasets:.1f}%)\n\n" + shown.to_markdown(index=False, disable_numparse=True) + "\n")
    return "\n".join(parts) + f"\n{NOTE}\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot(frame: pd.DataFrame, path: Path) -> Path:
    """Accuracy against layer, text and image lines with a ± std band, one panel per backbone."""
    import io

    plt = _pyplot()
    table = summary(frame)
    backbones = list(dict.fromkeys(table["backbone"]))
    fig, axes = plt.subplots(1, len(backbones), figsize=(5.2 * len(backbones), 3.6), squeeze=False)
    colours = {"text": "tab:red", "image": "tab:blue"}
    for ax, backbone in zip(axes[0], backbones):
        part = table[table["backbone"] == backbone]
        for tower in ("text", "image"):
            line = part.dropna(subset=[tower])
            x, mean, std = line["position"], line[tower], line[f"{tower}_std"]
            ax.plot(x, mean, marker="o", markersize=3, color=colours[tower], label=f"{tower} features")
            ax.fill_between(x, mean - std, mean + std, color=colours[tower], alpha=0.2, linewidth=0)
        datasets = int(frame.loc[frame["backbone"] == backbone, "datasets"].iloc[0])
        ax.axhline(100 / datasets, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xticks(list(part["position"]))
        ax.set_xticklabels(list(part["layer"]), rotation=90 if len(part) > 16 else 0, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("dataset-level accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(backbone, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def write_outputs(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``dataset_level.csv``, ``dataset_level.md`` and ``dataset_level.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    csv = write_atomic(out_dir / "dataset_level.csv",
                       lambda handle: handle.write(frame.to_csv(index=False).encode("utf-8")))
    md = write_bytes_atomic(out_dir / "dataset_level.md", markdown(frame).encode("utf-8"))
    return [csv, md, plot(frame, out_dir / "dataset_level.png")]
