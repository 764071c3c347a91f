"""Landmark metrics: radial error in mm, MRE +- SD and success detection rates.

The radial error of a landmark is the Euclidean distance in mm between the predicted and
the reference world point (the paper's "mean error values in millimeters", Sec. 3.4,
Table 3). MRE is its mean (over cases per landmark, over all case-landmark pairs overall)
with the standard deviation (population SD, ddof=0); the success detection rate SDR(r) is
the percentage of errors <= r mm, reported at 2, 2.5, 3 and 4 mm.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..errors import UserError
from .io import check_landmark_names, landmark_folder, list_landmark_files, read_landmarks

SDR_THRESHOLDS_MM = (2.0, 2.5, 3.0, 4.0)


def radial_errors(pred: Mapping[str, Mapping[str, Sequence[float]]],
                  ref: Mapping[str, Mapping[str, Sequence[float]]],
                  names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{case: {name: error mm}} for the cases of ``ref`` (all must be in ``pred``)."""
    out = {}
    for case, marks in ref.items():
        out[case] = {n: float(np.linalg.norm(np.asarray(pred[case][n], dtype=np.float64)
                                             - np.asarray(marks[n], dtype=np.float64)))
                     for n in names}
    return out


def _stats(errors: np.ndarray, thresholds: Sequence[float]) -> dict:
    return {"mre_mm": float(errors.mean()), "sd_mm": float(errors.std()),
            "median_mm": float(np.median(errors)), "max_mm": float(errors.max()),
            "n": int(errors.size),
            "sdr_percent": {f"{t:g}": float(100.0 * np.mean(errors <= t)) for t in thresholds}}


def summarize_errors(errors: Mapping[str, Mapping[str, float]], names: Sequence[str],
                     thresholds: Sequence[float] = SDR_THRESHOLDS_MM) -> dict:
    """Per-landmark and overall MRE, SD, median, max and SDR from :func:`radial_errors`."""
    if not errors:
        raise ValueError("no cases to summarise")
    table = np.array([[errors[c][n] for n in names] for c in errors], dtype=np.float64)
    return {"landmarks": list(names), "cases": list(errors),
            "thresholds_mm": [float(t) for t in thresholds],
            "per_landmark": {n: _stats(table[:, j], thresholds) for j, n in enumerate(names)},
            "overall": _stats(table.ravel(), thresholds),
            "per_case_mre_mm": {c: float(np.mean(list(errors[c].values()))) for c in errors}}


def markdown_table(summary: dict) -> str:
    """The summary as a Markdown table: one row per landmark plus the overall row."""
    ths = [f"{t:g}" for t in summary["thresholds_mm"]]
    head = ("| Landmark | MRE ± SD (mm) | Median (mm) | Max (mm) | "
            + " | ".join(f"SDR {t} mm (%)" for t in ths) + " |")
    sep = "|" + "---|" * (4 + len(ths))
    rows = [head, sep]
    for name, s in list(summary["per_landmark"].items()) + [("**All**", summary["overall"])]:
        rows.append(f"| {name} | {s['mre_mm']:.2f} ± {s['sd_mm']:.2f} | {s['median_mm']:.2f} | "
                    f"{s['max_mm']:.2f} | " + " | ".join(f"{s['sdr_percent'][t]:.1f}" for t in ths)
                    + " |")
    n_cases = len(summary["cases"])
    return "\n".join(rows) + f"\n\n{n_cases} case(s), {len(summary['landmarks'])} landmark(s).\n"


def evaluate_folders(pred_dir, ref_dir, out_dir=None,
                     thresholds: Sequence[float] = SDR_THRESHOLDS_MM) -> dict:
    """Compare the landmark files of ``pred_dir`` with those of ``ref_dir``.

    ``ref_dir`` is a landmark folder or a dataset folder holding ``landmarks/``. Every
    reference case needs a prediction with the same landmark names (extra predictions are
    listed in the summary and not scored). Writes ``summary.json``, ``summary.md`` and
    ``per_case.csv`` into ``out_dir`` when given; returns the summary.
    """
    pred_dir, ref_dir = Path(pred_dir), landmark_folder(ref_dir)
    refs_files = list_landmark_files(ref_dir)
    if not refs_files:
        raise UserError(f"{ref_dir}: no reference landmark files (<CASE>.json or .csv).")
    preds_files = list_landmark_files(pred_dir)
    missing = [c for c in refs_files if c not in preds_files]
    if missing:
        raise UserError(f"{pred_dir}: no prediction for reference case(s) "
                        f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''} "
                        f"(expected e.g. {pred_dir / missing[0]}.json). Predict those cases "
                        f"or evaluate against a reference folder holding only the predicted cases.")
    refs = {c: read_landmarks(p) for c, p in refs_files.items()}
    names = check_landmark_names(refs, files=refs_files)
    preds = {c: read_landmarks(preds_files[c]) for c in refs}
    check_landmark_names(preds, expected=names, files=preds_files,
                         expected_from="the reference landmarks")
    errors = radial_errors(preds, refs, names)
    summary = summarize_errors(errors, names, thresholds)
    summary["pred_dir"], summary["ref_dir"] = str(pred_dir), str(ref_dir)
    summary["unscored_predictions"] = [c for c in preds_files if c not in refs_files]
    if out_dir is not None:
        write_evaluation(summary, errors, out_dir)
    return summary


def write_evaluation(summary: dict, errors: Mapping[str, Mapping[str, float]], out_dir) -> None:
    """summary.json, summary.md and per_case.csv (error mm per case and landmark)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..safe_io import atomic_open, atomic_write_text  # temporary file + rename, no symlink followed

    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n", overwrite=True)
    atomic_write_text(out_dir / "summary.md", markdown_table(summary), overwrite=True)
    names = summary["landmarks"]
    with atomic_open(out_dir / "per_case.csv", "w", overwrite=True, newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", *names, "mean"])
        for case, row in errors.items():
            vals = [row[n] for n in names]
            w.writerow([case, *[f"{v:.4f}" for v in vals], f"{np.mean(vals):.4f}"])


def format_overall(summary: dict, unit: Optional[str] = "mm") -> str:
    """One line: 'MRE 1.23 ± 0.45 mm, SDR 2/2.5/3/4 mm: 80.0/...%'."""
    s = summary["overall"]
    ths = list(s["sdr_percent"])
    return (f"MRE {s['mre_mm']:.2f} ± {s['sd_mm']:.2f} {unit}, SDR {'/'.join(ths)} mm: "
            + "/".join(f"{s['sdr_percent'][t]:.1f}" for t in ths) + " %")
