"""The paper's Table 1 layout: rows of Dice (%) and HD95 (mm), Markdown, CSV and a box plot.

:func:`write_table1` writes what ``nnmamba brats2023 reproduce`` leaves in its output folder
(``table1.md``, ``table1.csv``, ``table1_lesionwise.csv``, ``table1_boxplot.png``) from the
summaries of :func:`~.metrics.evaluate_folder`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .layout import REGIONS

#: The numbers reported in the paper's Table 1 (Gong et al. 2024, BraTS 2023 GLI test split):
#: method -> (Dice WT, TC, ET, Average in %), (HD95 WT, TC, ET, Average in mm). Printed next to
#: the measured table for comparison only; never mixed into measured results.
PAPER_TABLE1 = {
    "ViT": ((92.97, 88.88, 84.30, 88.72), (5.20, 6.06, 12.83, 8.03)),
    "DIT": ((93.49, 90.22, 84.38, 89.36), (4.21, 5.27, 13.64, 7.71)),
    "UNETR": ((93.33, 89.89, 85.19, 89.47), (4.76, 7.27, 12.78, 8.27)),
    "nnUNet": ((93.31, 90.24, 85.18, 89.58), (4.49, 4.95, 11.91, 7.12)),
    "nnMamba": ((93.70, 90.67, 85.65, 90.01), (3.88, 6.82, 11.59, 7.43)),
}

TABLE_REGIONS = tuple(REGIONS)  # WT, TC, ET


@dataclass(frozen=True)
class Table1Row:
    """One row of the paper's Table 1: Dice (%) and HD95 (mm) for WT, TC, ET and their average."""

    method: str
    dice: tuple       # (WT, TC, ET, Average) in %
    hd95: tuple       # (WT, TC, ET, Average) in mm
    dice_std: tuple = ()   # (WT, TC, ET) population std over cases, in %
    hd95_std: tuple = ()   # (WT, TC, ET) in mm
    n_cases: int | None = None

    @classmethod
    def from_summary(cls, method: str, summary: dict) -> "Table1Row":
        """From :func:`~.metrics.evaluate_folder`'s summary (Dice as fractions there)."""
        regions = summary["regions"]
        dice = tuple(100.0 * regions[r]["dice"]["mean"] for r in TABLE_REGIONS)
        hd95 = tuple(regions[r]["hd95"]["mean"] for r in TABLE_REGIONS)
        return cls(method, dice + (100.0 * summary["average"]["dice"],), hd95 + (summary["average"]["hd95"],),
                   tuple(100.0 * regions[r]["dice"]["std"] for r in TABLE_REGIONS),
                   tuple(regions[r]["hd95"]["std"] for r in TABLE_REGIONS), summary["n_cases"])


TABLE1_HEADER = ["Method"] + [f"Dice {r}" for r in (*TABLE_REGIONS, "Average")] + \
                [f"HD95 {r}" for r in (*TABLE_REGIONS, "Average")]


def format_table1_markdown(rows) -> str:
    """Markdown table in the layout of the paper's Table 1 (values to 2 decimals)."""
    lines = ["| " + " | ".join(TABLE1_HEADER) + " |",
             "|" + "---|" + "---:|" * (len(TABLE1_HEADER) - 1)]
    for row in rows:
        cells = [row.method] + [f"{v:.2f}" for v in (*row.dice, *row.hd95)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table1_csv(rows, path: Path) -> Path:
    """CSV with one row per method: means, then the per-region std, then the number of cases."""
    names = [f"dice_{r}" for r in (*TABLE_REGIONS, "Average")] + [f"hd95_{r}" for r in (*TABLE_REGIONS, "Average")]
    std_names = [f"dice_{r}_std" for r in TABLE_REGIONS] + [f"hd95_{r}_std" for r in TABLE_REGIONS]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *names, *std_names, "n_cases"])
        for row in rows:
            writer.writerow([row.method, *(f"{v:.4f}" for v in (*row.dice, *row.hd95)),
                             *(f"{v:.4f}" for v in (*row.dice_std, *row.hd95_std)), row.n_cases])
    return path


def paper_rows() -> list:
    return [Table1Row(m, d, h) for m, (d, h) in PAPER_TABLE1.items()]


def plot_per_case(summaries: dict, path: Path, title: str = "") -> Path:
    """Box plots of the per-case Dice (%) and HD95 (mm): one panel per metric and region, one box per method."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(summaries)
    fig = Figure(figsize=(4.2 * len(TABLE_REGIONS), 7.5))
    FigureCanvasAgg(fig)  # the Agg (file-only) backend, without touching pyplot's global state
    axes = fig.subplots(2, len(TABLE_REGIONS), squeeze=False)
    for row, (metric, unit, scale) in enumerate((("dice", "Dice (%)", 100.0), ("hd95", "HD95 (mm)", 1.0))):
        for col, region in enumerate(TABLE_REGIONS):
            ax = axes[row][col]
            data = [[scale * case[region][metric] for case in summaries[m]["per_case"].values()] for m in methods]
            ax.boxplot(data, showmeans=True, showfliers=False)
            for i, values in enumerate(data, start=1):  # every case as a dot (few cases, outliers)
                jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
                ax.scatter(i + jitter, values, s=6, alpha=0.5, color="tab:blue", zorder=3)
            ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{region} {unit}")
            ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


@dataclass(frozen=True)
class Table1Files:
    """What :func:`write_table1` wrote: the rows, the Markdown (without caption) and the files."""

    rows: list            # whole volume (legacy)
    lesion_rows: list     # lesion-wise
    markdown: str
    markdown_file: Path
    csv_file: Path
    boxplot_file: Path


def write_table1(out: Path, summaries: dict, caption: str, plot_title: str, convention: str) -> Table1Files:
    """``table1.md`` (caption, measured tables, the paper's numbers), ``table1.csv`` (the
    whole-volume rows, else the lesion-wise ones), ``table1_lesionwise.csv`` when there are
    both, and ``table1_boxplot.png`` in ``out``; ``summaries``: row label -> summary."""
    rows = [Table1Row.from_summary(t, s) for t, s in summaries.items() if "regions" in s]  # whole volume
    lesion_rows = [Table1Row.from_summary(t, s["lesionwise"]) for t, s in summaries.items() if "lesionwise" in s]
    markdown = "\n\n".join(
        ([f"Whole volume (legacy), convention {convention}:\n\n{format_table1_markdown(rows)}"] if rows else []) +
        ([f"Lesion-wise (BraTS 2023 challenge ranking; docs/brats2023.md):\n\n{format_table1_markdown(lesion_rows)}"]
         if lesion_rows else []))
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "table1.md"
    md_path.write_text(f"# nnMamba Table 1 reproduction\n\n{caption}\n\n{markdown}\n\n"
                       "## Reported in the paper (Gong et al. 2024, Table 1), for comparison\n\n"
                       f"{format_table1_markdown(paper_rows())}\n")
    csv_path = write_table1_csv(rows or lesion_rows, out / "table1.csv")  # lesion-wise alone: its rows
    if rows and lesion_rows:
        write_table1_csv(lesion_rows, out / "table1_lesionwise.csv")
    png_path = plot_per_case(summaries if rows else {t: s["lesionwise"] for t, s in summaries.items()},
                             out / "table1_boxplot.png", plot_title)
    return Table1Files(rows, lesion_rows, markdown, md_path, csv_path, png_path)
