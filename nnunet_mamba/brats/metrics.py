"""BraTS region metrics: per-case, per-region Dice and HD95 (nnMamba paper, Table 1; issue 15).

Regions are WT = {1, 2, 3}, TC = {1, 3}, ET = {3} of the native BraTS 2023 labels. Two blocks
(``metrics``: ``legacy``, ``lesionwise`` or ``both``):

- legacy (whole volume): Dice ``2 |P & R| / (|P| + |R|)`` on the binary region masks; HD95
  (mm) by the definition of the chosen :data:`CONVENTIONS` entry (:mod:`.hd95`): ``brats2023``
  the surface-element-weighted one of the BraTS code, ``nnunet-v1`` and ``segmamba`` medpy's
  pooled percentile at 1 mm (their scripts ignore the spacing), ``monai`` MONAI's max of the
  directed percentiles at the image spacing (what this module computed before). Empty masks
  take the convention's values. SimpleITK reports spacing in (x, y, z) order while the
  arrays are (z, y, x); the spacing is reversed accordingly.
- lesionwise: the BraTS 2023 challenge's lesion-wise Dice / HD95 with lesion counts
  (:mod:`.lesionwise`); independent of the convention.

Both files of a case must share one voxel grid (size, spacing, origin, direction); labels
must be integers 0-3. Anything else is an error naming the file, never a silent number.
"""
from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .layout import REGIONS, SEG, case_file_name, is_case_id

NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class EmptyMaskConvention:
    """How one benchmark scores a region: its HD95 definition and its values for empty masks.

    ``hd95`` names a definition of :data:`.hd95.HD95_DEFINITIONS`; ``hd95_spacing`` is
    ``"image"`` (the file's voxel size) or ``"1mm"`` (the script assumes 1 mm voxels).
    """

    name: str
    both_empty_dice: float
    both_empty_hd95: float
    one_empty_dice: float
    one_empty_hd95: float
    source: str
    hd95: str = "surface-weighted"
    hd95_spacing: str = "image"


CONVENTIONS = {
    "brats2023": EmptyMaskConvention(
        "brats2023", 1.0, 0.0, 0.0, 374.0,
        "BraTS 2023 legacy whole-image metrics: HD95 surface-element weighted (DeepMind surface-distance) at the "
        "image spacing; both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 374",
        "surface-weighted", "image"),
    "nnunet-v1": EmptyMaskConvention(
        "nnunet-v1", 1.0, 0.0, 0.0, 373.12866,
        "nnU-Net v1 BraTS evaluation: HD95 medpy pooled 95th percentile with 1 mm voxels assumed (the script "
        "ignores the spacing); both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 373.12866 (the "
        "240x240x155 image diagonal)",
        "pooled", "1mm"),
    "segmamba": EmptyMaskConvention(
        "segmamba", 0.0, 50.0, 0.0, 50.0,
        "SegMamba's 5_compute_metrics.py: HD95 medpy pooled 95th percentile with voxel_spacing [1, 1, 1]; Dice 0, "
        "HD95 50 whenever either mask is empty, even both",
        "pooled", "1mm"),
    "monai": EmptyMaskConvention(
        "monai", 1.0, 0.0, 0.0, 374.0,
        "this package before issue 15: HD95 MONAI compute_hausdorff_distance (max of the directed 95th "
        "percentiles) at the image spacing; empty masks as brats2023",
        "monai", "image"),
}


def hd95_library(convention: "EmptyMaskConvention | str" = "brats2023") -> str:
    """The HD95 definition and implementation a convention uses, with the library versions."""
    import monai
    import monai.metrics  # noqa: F401  (imported here once, so forked workers inherit it)
    import scipy

    from .hd95 import HD95_DEFINITIONS

    conv = get_convention(convention) if isinstance(convention, str) else convention
    spacing = "1 mm voxels assumed (spacing ignored)" if conv.hd95_spacing == "1mm" else "image spacing"
    versions = {"surface-weighted": f"MONAI {monai.__version__} (normals table), SciPy {scipy.__version__}",
                "pooled": f"SciPy {scipy.__version__}", "monai": f"MONAI {monai.__version__}"}[conv.hd95]
    return f"{conv.hd95}, {spacing}: {HD95_DEFINITIONS[conv.hd95]}; {versions}"


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (the conventions decide then)."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx, definition: str = "monai") -> float:
    """HD95 in mm of two non-empty boolean (z, y, x) masks by one of :data:`.hd95.HD95_DEFINITIONS`.

    ``spacing_zyx`` is the voxel size along the array axes (SimpleITK's spacing reversed).
    """
    from .hd95 import hd95 as hd95_by_definition

    return hd95_by_definition(pred, ref, spacing_zyx, definition)


def region_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing_zyx,
                   convention: EmptyMaskConvention | str = "brats2023") -> dict:
    """Dice and HD95 of every region of :data:`REGIONS` for two label arrays of one case.

    HD95 by the convention's definition (at 1 mm where the convention assumes 1 mm).
    Returns ``{region: {"dice": float, "hd95": float, "empty": "none" | "both" | "pred" | "ref"}}``.
    """
    if isinstance(convention, str):
        convention = get_convention(convention)
    spacing = (1.0, 1.0, 1.0) if convention.hd95_spacing == "1mm" else spacing_zyx
    out = {}
    for region, labels in REGIONS.items():
        pred = np.isin(pred_labels, labels)
        ref = np.isin(ref_labels, labels)
        has_pred, has_ref = bool(pred.any()), bool(ref.any())
        if has_pred and has_ref:
            out[region] = {"dice": dice(pred, ref), "hd95": hd95(pred, ref, spacing, convention.hd95),
                           "empty": "none"}
        elif not has_pred and not has_ref:
            out[region] = {"dice": convention.both_empty_dice, "hd95": convention.both_empty_hd95, "empty": "both"}
        else:
            out[region] = {"dice": convention.one_empty_dice, "hd95": convention.one_empty_hd95,
                           "empty": "pred" if not has_pred else "ref"}
    return out


def get_convention(name: str) -> EmptyMaskConvention:
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise UserError(f"unknown empty-mask convention {name!r}; choose from {', '.join(CONVENTIONS)}") from None


# ----------------------------------------------------------------------------- files

def _strip_ending(name: str):
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def find_reference_cases(ref_dir: str | Path) -> dict[str, Path]:
    """Reference label files by case: ``<case>.nii.gz`` files (nnU-Net labelsTs) or BraTS case folders."""
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise UserError(f"--ref {ref_dir} is not a folder")
    flat = {}
    for p in ref_dir.iterdir():
        case = _strip_ending(p.name)
        if p.is_file() and case is not None:
            if case in flat:
                raise UserError(f"--ref {ref_dir} holds {flat[case].name} and {p.name} for case {case}; keep one")
            flat[case] = p
    brats = {p.name: p / case_file_name(p.name, SEG) for p in ref_dir.iterdir()
             if p.is_dir() and is_case_id(p.name)}
    if flat and brats:
        raise UserError(f"--ref {ref_dir} holds both label files and BraTS case folders; point it at one kind")
    if brats:
        missing = [str(f) for f in brats.values() if not f.is_file()]
        if missing:
            raise UserError(f"reference segmentation missing: {missing[0]} ({len(missing)} case(s) lack their "
                            f"-seg file); add them or remove those case folders from --ref")
        return dict(sorted(brats.items()))
    if not flat:
        raise UserError(f"no reference segmentations in {ref_dir} (expected <case>.nii.gz files such as an "
                        "nnU-Net labelsTs folder, or BraTS-GLI-XXXXX-XXX/ folders with -seg.nii.gz)")
    return dict(sorted(flat.items()))


def find_prediction_cases(pred_dir: str | Path) -> dict[str, Path]:
    """Prediction files by case: ``<case>.nii.gz`` (nnU-Net / BraTS submission naming)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"--pred {pred_dir} is not a folder")
    out = {}
    for p in pred_dir.iterdir():
        case = _strip_ending(p.name)
        if p.is_file() and case is not None:
            if case in out:
                raise UserError(f"--pred {pred_dir} holds {out[case].name} and {p.name} for case {case}; keep one")
            out[case] = p
    return dict(sorted(out.items()))


def _read_labels(path: Path, role: str):
    from ..imaging import ImageError, read_array

    try:  # the one image reader: refuses truncated / unreadable / non-3D files and NaN/inf voxels
        array, image = read_array(path)
    except ImageError as e:
        raise UserError(f"{role} {e}") from None
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            raise UserError(f"{role} {path} holds non-integer or NaN values; labels must be integers 0-3")
    if array.size and (array.min() < 0 or array.max() > 3):
        bad = np.unique(array[(array < 0) | (array > 3)])[:10]
        raise UserError(f"{role} {path} holds label(s) {', '.join(f'{v:g}' for v in bad.astype(float))} outside "
                        "0-3; BraTS 2023 labels are 0 background, 1 NCR, 2 ED, 3 ET (map ET 4 -> 3 for "
                        "BraTS 2021-style files)")
    geometry = {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
                "direction": image.GetDirection()}
    return array.astype(np.uint8, copy=False), geometry


METRICS = ("legacy", "lesionwise", "both")


def _blocks(metrics: str) -> tuple:
    if metrics not in METRICS:
        raise UserError(f"unknown --metrics {metrics!r}; choose from {', '.join(METRICS)}")
    return ("legacy", "lesionwise") if metrics == "both" else (metrics,)


def evaluate_case(case: str, pred_path, ref_path, convention: str = "brats2023", metrics: str = "both") -> list[dict]:
    """One row per region of one case (raises UserError on bad input).

    Rows: ``{case, region, spacing_zyx}``, with ``metrics`` legacy: ``dice, hd95, empty``
    (:func:`region_metrics`), lesionwise: ``lesionwise`` (:func:`.lesionwise.lesionwise_region`).
    """
    from .convert import geometry_differences
    from .lesionwise import lesionwise_metrics

    conv = get_convention(convention)
    blocks = _blocks(metrics)
    pred, pred_geom = _read_labels(Path(pred_path), "prediction")
    ref, ref_geom = _read_labels(Path(ref_path), "reference")
    diffs = geometry_differences(pred_geom, ref_geom)
    if diffs:
        raise UserError(f"prediction {pred_path} does not lie on the grid of reference {ref_path}: "
                        f"{'; '.join(diffs)}. Predict on the original images (nnUNetv2_predict writes them on "
                        "the input grid) or resample the prediction onto the reference")
    spacing_zyx = tuple(reversed(ref_geom["spacing"]))
    legacy = region_metrics(pred, ref, spacing_zyx, conv) if "legacy" in blocks else {}
    lesion = lesionwise_metrics(pred, ref, spacing_zyx) if "lesionwise" in blocks else {}
    rows = []
    for region in REGIONS:
        row = {"case": case, "region": region, **legacy.get(region, {}), "spacing_zyx": list(spacing_zyx)}
        if lesion:
            row["lesionwise"] = lesion[region]
        rows.append(row)
    return rows


def _evaluate_case_job(job):
    import torch

    torch.set_num_threads(1)
    try:
        return evaluate_case(*job), None
    except UserError as e:
        return None, str(e)


def _stats(values) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std())}


def evaluate_folder(pred_dir, ref_dir, convention: str = "brats2023", n_jobs: int = 1, metrics: str = "both") -> dict:
    """Evaluate every reference case against its prediction; returns the summary dict.

    Keys: ``metrics``, ``convention`` (name, values, HD95 definition, source), ``library``,
    ``n_cases``, ``pred_dir``,
    ``ref_dir``, ``regions`` ({region: {labels, dice: {mean, std}, hd95: {mean, std},
    n_empty}}), ``average`` ({dice, hd95}: the mean over WT, TC, ET of the region means,
    as in the paper's "Average" column), ``per_case`` ({case: {region: {dice, hd95,
    empty}}}), ``rows`` (the per_case.csv rows) and ``ignored_predictions`` (prediction files
    without a reference). Dice is a fraction (0-1), HD95 in mm; std is the population std.
    ``regions`` / ``average`` / ``per_case`` are the legacy block (absent with ``metrics=
    "lesionwise"``); ``lesionwise`` (absent with ``"legacy"``) is :func:`.lesionwise.summarize`'s
    block with the same ``regions`` / ``average`` layout plus lesion counts. ``warnings`` lists
    what makes the numbers less comparable (a 1-mm convention on other voxel sizes).
    A reference case without a prediction is an error naming it.
    """
    from .lesionwise import summarize

    conv = get_convention(convention)
    blocks = _blocks(metrics)
    refs = find_reference_cases(ref_dir)
    preds = find_prediction_cases(pred_dir)
    missing = [c for c in refs if c not in preds]
    if missing:
        raise UserError(f"{len(missing)} reference case(s) have no prediction in {pred_dir}: "
                        f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
                        f"(expected e.g. {Path(pred_dir) / (missing[0] + '.nii.gz')}); predict them or evaluate "
                        "against a reference folder holding only the predicted cases")
    ignored = sorted(c for c in preds if c not in refs)
    jobs = [(c, str(preds[c]), str(refs[c]), conv.name, metrics) for c in refs]
    library = hd95_library(conv)  # imports MONAI (seconds) once here, so forked workers inherit it
    if n_jobs > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs))) as pool:
            results = list(pool.map(_evaluate_case_job, jobs))
    else:
        results = [_evaluate_case_job(j) for j in jobs]
    errors = [e for _, e in results if e]
    if errors:
        raise UserError(f"{len(errors)} case(s) could not be evaluated:\n  " + "\n  ".join(errors))
    rows = [row for case_rows, _ in results for row in case_rows]
    summary = {"metrics": metrics, "convention": asdict(conv), "library": library}
    if "lesionwise" in blocks:
        lesion_cases = {}
        for row in rows:
            lesion_cases.setdefault(row["case"], {})[row["region"]] = row["lesionwise"]
        summary["lesionwise"] = summarize(lesion_cases)
    warn = []
    off_grid = sorted({r["case"] for r in rows if any(abs(s - 1.0) > 1e-6 for s in r["spacing_zyx"])})
    if "legacy" in blocks and conv.hd95_spacing == "1mm" and off_grid:
        warn.append(f"convention {conv.name} computes HD95 with 1 mm voxels as its script does, but "
                    f"{len(off_grid)} case(s) have other voxel sizes (e.g. {off_grid[0]}): their whole-volume HD95 "
                    "is in voxel units, not mm; use --convention brats2023 or monai for mm")
    base = {"n_cases": len(refs), "pred_dir": str(Path(pred_dir).resolve()), "ref_dir": str(Path(ref_dir).resolve()),
            "rows": rows, "ignored_predictions": ignored, "warnings": warn}
    if "legacy" not in blocks:
        return {**summary, **base}
    per_case = {}
    for row in rows:
        per_case.setdefault(row["case"], {})[row["region"]] = {k: row[k] for k in ("dice", "hd95", "empty")}
    regions = {}
    for region, labels in REGIONS.items():
        region_rows = [r for r in rows if r["region"] == region]
        regions[region] = {"labels": list(labels),
                           "dice": _stats([r["dice"] for r in region_rows]),
                           "hd95": _stats([r["hd95"] for r in region_rows]),
                           "n_empty": {k: sum(r["empty"] == k for r in region_rows) for k in ("both", "pred", "ref")}}
    return {
        **summary,
        "dice": "2|P&R| / (|P|+|R|) on the region masks, as a fraction",
        "regions": regions,
        "average": {m: float(np.mean([regions[r][m]["mean"] for r in REGIONS])) for m in ("dice", "hd95")},
        "per_case": per_case,
        **base,
    }


LESION_COLUMNS = ("lesionwise_dice", "lesionwise_hd95", "lesions", "kept", "tp", "missed", "fp")


def write_results(summary: dict, out_dir) -> tuple[Path, Path]:
    """Write ``per_case.csv`` and ``summary.json`` into ``out_dir``.

    CSV columns: case, region, then (legacy) dice, hd95, empty_mask, then (lesionwise)
    lesionwise_dice, lesionwise_hd95 and the counts lesions, kept, tp, missed, fp.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "per_case.csv"
    from ..safe_io import atomic_open, atomic_write_text

    with atomic_open(csv_path, "w", overwrite=True, newline="") as f:  # temporary file + rename
        writer = csv.writer(f)  # empty_mask: none, or which mask was empty (values from the convention)
        legacy, lesion = "regions" in summary, "lesionwise" in summary
        writer.writerow(["case", "region"] + (["dice", "hd95", "empty_mask"] if legacy else []) +
                        (list(LESION_COLUMNS) if lesion else []))
        for row in summary["rows"]:
            cells = [row["case"], row["region"]]
            if legacy:
                cells += [f"{row['dice']:.6f}", f"{row['hd95']:.6f}", row.get("empty", "none")]
            if lesion:
                lw = row["lesionwise"]
                cells += [f"{lw['dice']:.6f}", f"{lw['hd95']:.6f}", *(lw[k] for k in LESION_COLUMNS[2:])]
            writer.writerow(cells)
    json_path = out_dir / "summary.json"
    content = {k: v for k, v in summary.items() if k != "rows"}
    atomic_write_text(json_path, json.dumps(content, indent=2) + "\n", overwrite=True)
    return csv_path, json_path


def format_table(summary: dict) -> str:
    """Table-1 style text tables (Dice in %, HD95 in mm, mean +- std): whole volume, then lesion-wise."""
    from .lesionwise import format_table as format_lesionwise

    parts = []
    if "regions" in summary:
        parts.append(f"whole volume (legacy), convention {summary['convention']['name']}:\n" +
                     _format_legacy(summary))
    if "lesionwise" in summary:
        parts.append("lesion-wise (BraTS 2023 challenge ranking):\n" + format_lesionwise(summary["lesionwise"]))
    return "\n\n".join(parts)


def _format_legacy(summary: dict) -> str:
    lines = [f"{'region':<8}{'Dice (%)':>18}{'HD95 (mm)':>20}"]
    for region, r in summary["regions"].items():
        lines.append(f"{region:<8}{100 * r['dice']['mean']:>10.2f} +- {100 * r['dice']['std']:5.2f}"
                     f"{r['hd95']['mean']:>12.2f} +- {r['hd95']['std']:6.2f}")
    avg = summary["average"]
    lines.append(f"{'Average':<8}{100 * avg['dice']:>10.2f}{'':9}{avg['hd95']:>12.2f}")
    return "\n".join(lines)


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))
