"""Lesion-wise Dice and HD95: how the BraTS 2023 GLI challenge ranks segmentations (issue 15).

The rules (the challenge's public metrics code for 2023, re-implemented here), per region
WT = {1, 2, 3}, TC = {1, 3}, ET = {3}:

1. Components are 26-connected (``scipy.ndimage.label`` with a 3x3x3 block of ones).
2. The reference mask is dilated 3 times with ``generate_binary_structure(3, 2)`` (18-
   neighbourhood); the reference voxels inside one component of that dilated mask form one
   *lesion* (nearby reference components merge). The lesion's own 3-fold dilation is that
   component.
3. Every predicted component that touches a lesion's dilation counts towards that lesion
   (a predicted component may count towards several lesions); Dice and HD95 are taken
   between the lesion and the union of its predicted components. A lesion without any is
   *missed*: Dice 0, HD95 374.
4. Lesions of at most 50 mm^3 (voxel count x voxel volume, not voxels) are left out of the
   score, numerator and denominator; predicted components touching them are not false
   positives either (the official code collects matches before it filters).
5. A predicted component touching no lesion is a *false positive*: Dice 0, HD95 374.
6. Score = sum over kept lesions / (kept lesions + false positives), with 374 per false
   positive in the HD95 sum; no kept lesion and no false positive: Dice 1, HD95 0.

HD95 is the surface-element-weighted robust Hausdorff (:func:`.hd95.hd95_surface_weighted`,
DeepMind's ``surface-distance`` as the challenge uses it) with the image spacing. These
values are fixed by the challenge and do not depend on ``--convention``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .hd95 import HD95_DEFINITIONS, hd95_surface_weighted
from .layout import REGIONS

DILATION_ITERATIONS = 3
MIN_LESION_MM3 = 50.0
PENALTY_HD95 = 374.0
COUNT_KEYS = ("lesions", "kept", "tp", "missed", "fp")
RULES = (f"BraTS 2023 GLI lesion-wise: 26-connected components; reference dilated {DILATION_ITERATIONS}x with "
         "generate_binary_structure(3, 2), reference voxels in one dilated component = one lesion; predicted "
         "components touching a lesion's dilation count towards it; lesions <= "
         f"{MIN_LESION_MM3:g} mm^3 left out; unmatched predicted components are false positives (Dice 0, HD95 "
         f"{PENALTY_HD95:g}), missed lesions Dice 0, HD95 {PENALTY_HD95:g}; score = sum / (kept lesions + false "
         "positives); none and none: Dice 1, HD95 0")

_CONNECTIVITY_26 = np.ones((3, 3, 3), bool)
_DILATION = ndimage.generate_binary_structure(3, 2)


def _box_union(*boxes) -> tuple:
    return tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(3))


def lesionwise_region(pred: np.ndarray, ref: np.ndarray, spacing_zyx) -> dict:
    """Lesion-wise scores of one region: two boolean (z, y, x) masks, voxel size along the array axes.

    Returns ``{"dice", "hd95", "lesions", "kept", "tp", "missed", "fp", "lesion_list"}``:
    ``lesions`` reference lesions after merging by dilation, ``kept`` those > 50 mm^3, ``tp``
    kept and matched, ``missed`` kept and unmatched, ``fp`` unmatched predicted components;
    ``lesion_list`` one ``{"volume_mm3", "kept", "dice", "hd95", "pred_components"}`` per lesion.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape or pred.ndim != 3 or len(spacing_zyx) != 3:
        raise ValueError(f"masks {pred.shape} / {ref.shape} and spacing {tuple(spacing_zyx)} do not match (3D)")
    spacing = tuple(float(s) for s in spacing_zyx)
    voxel_mm3 = float(np.prod(spacing))
    if not pred.any() and not ref.any():
        return {"dice": 1.0, "hd95": 0.0, **{k: 0 for k in COUNT_KEYS}, "lesion_list": []}
    # work inside the bounding box of both masks, widened by the dilation reach (clipped to the image)
    margin = DILATION_ITERATIONS + 1
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, pred.shape))
    pred, ref = pred[box], ref[box]

    pred_cc, n_pred = ndimage.label(pred, structure=_CONNECTIVITY_26)
    dilated = ndimage.binary_dilation(ref, structure=_DILATION, iterations=DILATION_ITERATIONS)
    lesion_zone, n_lesions = ndimage.label(dilated, structure=_CONNECTIVITY_26)
    # lesion k = reference voxels in dilated component k; component k = the 3-fold dilation of lesion k
    pairs = np.unique(np.stack([lesion_zone[pred], pred_cc[pred]]), axis=1) if n_pred else np.zeros((2, 0), int)
    pairs = pairs[:, pairs[0] > 0]
    zone_boxes = ndimage.find_objects(lesion_zone)
    pred_boxes = ndimage.find_objects(pred_cc)
    matched_any = set(int(c) for c in pairs[1])

    lesion_list = []
    for k in range(1, n_lesions + 1):
        matches = sorted(int(c) for c in pairs[1][pairs[0] == k])
        sub = _box_union(zone_boxes[k - 1], *(pred_boxes[c - 1] for c in matches))
        lesion = ref[sub] & (lesion_zone[sub] == k)
        volume = int(np.count_nonzero(lesion)) * voxel_mm3
        if matches:
            found = np.isin(pred_cc[sub], matches)
            dice = 2.0 * int(np.count_nonzero(found & lesion)) / (int(np.count_nonzero(found)) +
                                                                  int(np.count_nonzero(lesion)))
            hd = hd95_surface_weighted(found, lesion, spacing)
        else:
            dice, hd = 0.0, PENALTY_HD95
        lesion_list.append({"volume_mm3": volume, "kept": volume > MIN_LESION_MM3, "dice": dice, "hd95": hd,
                            "pred_components": len(matches)})

    kept = [les for les in lesion_list if les["kept"]]
    n_fp = n_pred - len(matched_any)
    denominator = len(kept) + n_fp
    if denominator == 0:
        dice, hd = 1.0, 0.0
    else:
        dice = sum(les["dice"] for les in kept) / denominator
        hd = (sum(les["hd95"] for les in kept) + PENALTY_HD95 * n_fp) / denominator
    tp = sum(les["pred_components"] > 0 for les in kept)
    return {"dice": float(dice), "hd95": float(hd), "lesions": n_lesions, "kept": len(kept), "tp": int(tp),
            "missed": len(kept) - int(tp), "fp": int(n_fp), "lesion_list": lesion_list}


def lesionwise_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing_zyx) -> dict:
    """:func:`lesionwise_region` of every region of :data:`REGIONS` for two label arrays of one case."""
    return {region: lesionwise_region(np.isin(pred_labels, labels), np.isin(ref_labels, labels), spacing_zyx)
            for region, labels in REGIONS.items()}


def summarize(per_case: dict) -> dict:
    """Summary block over cases: ``{"rules", "hd95", "n_cases", "regions", "average", "per_case"}``.

    ``per_case`` is ``{case: {region: lesionwise_region(...)}}``. ``regions[r]`` holds the mean
    and population std over cases of the case scores (the challenge's per-case ranking
    values) and the summed counts; ``average`` the mean over WT, TC, ET of the region means.
    The layout of ``regions`` / ``average`` / ``n_cases`` matches the whole-volume summary.
    """
    regions = {}
    for region in REGIONS:
        values = [per_case[c][region] for c in per_case]
        regions[region] = {m: {"mean": float(np.mean([v[m] for v in values])),
                               "std": float(np.std([v[m] for v in values]))} for m in ("dice", "hd95")}
        regions[region]["counts"] = {k: int(sum(v[k] for v in values)) for k in COUNT_KEYS}
    return {
        "rules": RULES,
        "hd95": HD95_DEFINITIONS["surface-weighted"],
        "n_cases": len(per_case),
        "regions": regions,
        "average": {m: float(np.mean([regions[r][m]["mean"] for r in REGIONS])) for m in ("dice", "hd95")},
        "per_case": per_case,
    }


def format_table(block: dict) -> str:
    """Text table of a :func:`summarize` block (Dice in %, HD95 in mm, mean +- std, lesion counts)."""
    lines = [f"{'region':<8}{'Dice (%)':>18}{'HD95 (mm)':>20}   lesions kept  TP missed  FP"]
    for region, r in block["regions"].items():
        c = r["counts"]
        lines.append(f"{region:<8}{100 * r['dice']['mean']:>10.2f} +- {100 * r['dice']['std']:5.2f}"
                     f"{r['hd95']['mean']:>12.2f} +- {r['hd95']['std']:6.2f}"
                     f"   {c['lesions']:>7}{c['kept']:>5}{c['tp']:>4}{c['missed']:>7}{c['fp']:>4}")
    avg = block["average"]
    lines.append(f"{'Average':<8}{100 * avg['dice']:>10.2f}{'':9}{avg['hd95']:>12.2f}")
    return "\n".join(lines)
