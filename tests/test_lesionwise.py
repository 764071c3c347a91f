"""Lesion-wise BraTS 2023 metrics and the HD95 definition of each convention (issue 15), on cases
small enough to compute by hand (CPU, a few seconds)."""
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from nnunet_mamba.brats.hd95 import hd95, surface_distances
from nnunet_mamba.brats.lesionwise import lesionwise_metrics, lesionwise_region
from nnunet_mamba.brats.metrics import evaluate_folder, format_table, region_metrics, write_results
from nnunet_mamba.cli import main

COUNTS = ("lesions", "kept", "tp", "missed", "fp")


def _counts(result):
    return tuple(result[k] for k in COUNTS)


def _cube(mask, corner, size):
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


# ----------------------------------------------------------------------------- lesion-wise rules

def test_false_positive_blob_halves_dice_and_costs_374():
    ref = _cube(np.zeros((40, 40, 40), bool), (5, 5, 5), (10, 10, 10))
    pred = _cube(ref.copy(), (30, 30, 30), (3, 3, 3))  # 27 voxels, far from the lesion
    r = lesionwise_region(pred, ref, (1, 1, 1))
    # one perfect lesion (Dice 1, HD95 0) + one false positive (Dice 0, HD95 374), divided by 2
    assert (r["dice"], r["hd95"]) == (0.5, 187.0) and _counts(r) == (1, 1, 1, 0, 1)
    # the whole-volume Dice hardly notices it: 2 * 1000 / (1027 + 1000)
    assert region_metrics(pred * 2, ref * 2, (1, 1, 1))["WT"]["dice"] == pytest.approx(2000 / 2027)


def test_prediction_touching_the_3_fold_18_neighbourhood_dilation_counts_towards_the_lesion():
    ref = _cube(np.zeros((30, 30, 30), bool), (5, 5, 5), (10, 10, 10))  # voxels 5..14 on each axis
    # generate_binary_structure(3, 2) three times reaches offsets with max |d| <= 3 and sum |d| <= 6
    near = ref.copy()
    near[17, 17, 14] = True   # offset (3, 3, 0) from the corner voxel (14, 14, 14): reached
    r = lesionwise_region(near, ref, (1, 1, 1))
    assert _counts(r) == (1, 1, 1, 0, 0) and r["dice"] == pytest.approx(2000 / 2001)
    assert r["lesion_list"][0]["pred_components"] == 2
    far = ref.copy()
    far[17, 17, 15] = True    # offset (3, 3, 1): sum 7, outside the dilation -> false positive
    r = lesionwise_region(far, ref, (1, 1, 1))
    assert _counts(r) == (1, 1, 1, 0, 1) and (r["dice"], r["hd95"]) == (0.5, 187.0)


@pytest.mark.parametrize("gap,lesions", [(6, 1), (7, 2)])
def test_two_reference_components_merge_when_their_dilations_touch(gap, lesions):
    """Two 4^3 cubes `gap` voxels apart along z; dilations reach 3 voxels each and merge when adjacent."""
    ref = _cube(np.zeros((30, 12, 12), bool), (2, 4, 4), (4, 4, 4))          # z 2..5
    ref = _cube(ref, (6 + gap, 4, 4), (4, 4, 4))                              # z 6+gap..9+gap
    pred = _cube(np.zeros_like(ref), (2, 4, 4), (4, 4, 4))                    # only the first cube
    r = lesionwise_region(pred, ref, (1, 1, 1))
    assert r["lesions"] == lesions
    if lesions == 1:  # one lesion of 128 voxels, found by a 64-voxel component
        assert r["dice"] == pytest.approx(2 * 64 / (64 + 128)) and _counts(r) == (1, 1, 1, 0, 0)
        assert r["lesion_list"][0]["volume_mm3"] == 128.0
    else:             # found (Dice 1, HD95 0) + missed (Dice 0, HD95 374)
        assert (r["dice"], r["hd95"]) == (0.5, 187.0) and _counts(r) == (2, 2, 1, 1, 0)


def test_one_predicted_component_may_count_towards_two_lesions():
    ref = _cube(np.zeros((40, 10, 10), bool), (2, 3, 3), (4, 4, 4))
    ref = _cube(ref, (30, 3, 3), (4, 4, 4))
    pred = _cube(np.zeros_like(ref), (2, 3, 3), (32, 4, 4))  # a bar covering both cubes (512 voxels)
    r = lesionwise_region(pred, ref, (1, 1, 1))
    assert _counts(r) == (2, 2, 2, 0, 0)
    assert r["dice"] == pytest.approx(2 * 64 / (64 + 512))


@pytest.mark.parametrize("spacing,kept,dice,hd", [((1.0, 1.0, 1.0), 2, 0.5, 187.0),   # 64 mm^3: kept, missed
                                                  ((0.5, 0.5, 0.5), 1, 1.0, 0.0)])    # 8 mm^3: left out
def test_small_lesion_threshold_is_in_mm3_not_voxels(spacing, kept, dice, hd):
    ref = _cube(np.zeros((40, 40, 40), bool), (2, 2, 2), (10, 10, 10))
    ref = _cube(ref, (30, 30, 30), (4, 4, 4))                      # 64 voxels, 20+ voxels away
    pred = _cube(np.zeros_like(ref), (2, 2, 2), (10, 10, 10))    # the big lesion only, exactly
    r = lesionwise_region(pred, ref, spacing)
    assert r["lesions"] == 2 and r["kept"] == kept and r["missed"] == kept - 1 and r["fp"] == 0
    assert (r["dice"], r["hd95"]) == (dice, hd)
    assert r["lesion_list"][1]["volume_mm3"] == 64 * np.prod(spacing)
    # a predicted component on a left-out lesion is no false positive either
    r = lesionwise_region(ref, ref, spacing)
    assert r["fp"] == 0 and (r["dice"], r["hd95"]) == (1.0, 0.0)


def test_threshold_boundary_50_mm3_is_left_out_51_kept():
    for voxels, kept in ((50, 0), (51, 1)):
        ref = np.zeros((20, 20, 20), bool)
        ref.reshape(-1)[np.ravel_multi_index(np.unravel_index(np.arange(voxels), (5, 5, 3)), (20, 20, 20))] = True
        assert ndimage.label(ref, np.ones((3, 3, 3)))[1] == 1
        r = lesionwise_region(np.zeros_like(ref), ref, (1, 1, 1))
        assert r["kept"] == kept and r["missed"] == kept
        assert (r["dice"], r["hd95"]) == ((1.0, 0.0) if kept == 0 else (0.0, 374.0))


def test_missed_lesion_and_empty_cases():
    ref = _cube(np.zeros((20, 20, 20), bool), (5, 5, 5), (5, 5, 5))
    r = lesionwise_region(np.zeros_like(ref), ref, (1, 1, 1))
    assert (r["dice"], r["hd95"]) == (0.0, 374.0) and _counts(r) == (1, 1, 0, 1, 0)
    r = lesionwise_region(ref, np.zeros_like(ref), (1, 1, 1))          # prediction only: a false positive
    assert (r["dice"], r["hd95"]) == (0.0, 374.0) and _counts(r) == (0, 0, 0, 0, 1)
    r = lesionwise_region(np.zeros_like(ref), np.zeros_like(ref), (1, 1, 1))
    assert (r["dice"], r["hd95"]) == (1.0, 0.0) and _counts(r) == (0, 0, 0, 0, 0)
    # per region of a label map: oedema only -> TC and ET empty in both
    labels = ref.astype(np.uint8) * 2
    m = lesionwise_metrics(labels, labels, (1, 1, 1))
    assert (m["WT"]["dice"], m["WT"]["hd95"]) == (1.0, 0.0) and _counts(m["WT"]) == (1, 1, 1, 0, 0)
    assert _counts(m["ET"]) == (0, 0, 0, 0, 0) and (m["ET"]["dice"], m["ET"]["hd95"]) == (1.0, 0.0)


# ----------------------------------------------------------------------------- HD95 definitions

def _cube_and_plate(plate, spacing, distance=5):
    """Reference: a 10^3 cube. Prediction: the cube plus a one-voxel-thick plate x plate satellite
    `distance` voxels above its top face (along z), centred over it."""
    ref = _cube(np.zeros((30, 20, 20), bool), (4, 5, 5), (10, 10, 10))
    pred = ref.copy()
    offset = 5 + (10 - plate) // 2
    pred[13 + distance, offset:offset + plate, offset:offset + plate] = True
    return pred, ref


def _pooled_brute_force(a, b, spacing):
    edges = [np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing) for m in (a, b)]
    d = np.concatenate([cKDTree(edges[1]).query(edges[0])[0], cKDTree(edges[0]).query(edges[1])[0]])
    return float(np.percentile(d, 95))


def test_hd95_definitions_differ_on_a_satellite_plate():
    """Cube (488 edge voxels) + a 6x6 plate 5 voxels above it, z spacing 3 mm.

    - monai: pred -> ref, 36 of 524 edge voxels (6.9 % > 5 %) lie 5 x 3 = 15 mm away: 15.
    - pooled: 36 of the 1012 pooled distances (3.6 % < 5 %): 0.
    - surface-weighted: the plate's surface elements lie half a voxel off the voxels, its lower
      layer 4 x 3 = 12 mm and its upper 15 mm from the cube's; weighted by area (plate faces
      1 x 1 mm^2, the cube's side faces 3 x 1 mm^2), the cube's share is < 95 % and with the
      12-mm layer >= 95 %: 12.
    """
    spacing = (3.0, 1.0, 1.0)
    pred, ref = _cube_and_plate(6, spacing)
    assert hd95(pred, ref, spacing, "monai") == pytest.approx(15.0)
    assert hd95(pred, ref, spacing, "pooled") == 0.0 == _pooled_brute_force(pred, ref, spacing)
    s = surface_distances(pred, ref, spacing)
    share = {d: s["pred_areas"][s["pred_to_ref"] == d].sum() / s["pred_areas"].sum() for d in (0.0, 12.0, 15.0)}
    assert sum(share.values()) == pytest.approx(1.0) and share[0.0] < 0.95 <= share[0.0] + share[12.0]
    assert np.all(s["ref_to_pred"] == 0)
    assert hd95(pred, ref, spacing, "surface-weighted") == 12.0

    # through the conventions (the plate is oedema: WT only)
    by_convention = {c: region_metrics(pred * 2, ref * 2, spacing, c)["WT"]["hd95"]
                     for c in ("brats2023", "nnunet-v1", "segmamba", "monai")}
    assert by_convention == pytest.approx({"brats2023": 12.0, "nnunet-v1": 0.0, "segmamba": 0.0, "monai": 15.0})


def test_one_mm_conventions_ignore_the_spacing():
    """An 8x8 plate (64 of 1040 pooled edge voxels, 6.2 % > 5 %) 5 voxels above the cube, z spacing 2 mm:
    the pooled percentile is 5 voxels; nnU-Net v1 and SegMamba report 5 (1 mm assumed), the others 10 mm."""
    spacing = (2.0, 1.0, 1.0)
    pred, ref = _cube_and_plate(8, spacing)
    assert hd95(pred, ref, (1, 1, 1), "pooled") == pytest.approx(_pooled_brute_force(pred, ref, (1, 1, 1))) == 5.0
    assert hd95(pred, ref, spacing, "pooled") == pytest.approx(10.0)
    by_convention = {c: region_metrics(pred * 2, ref * 2, spacing, c)["WT"]["hd95"]
                     for c in ("brats2023", "nnunet-v1", "segmamba", "monai")}
    assert by_convention == pytest.approx({"brats2023": 10.0, "nnunet-v1": 5.0, "segmamba": 5.0, "monai": 10.0})


def test_pooled_equals_medpy_where_installed():
    binary = pytest.importorskip("medpy.metric.binary")  # not a dependency; the definition's origin
    rng = np.random.default_rng(3)
    for spacing in ((1.0, 1.0, 1.0), (2.5, 0.7, 1.2)):
        a = ndimage.binary_dilation(rng.random((18, 20, 22)) < 0.01, iterations=2)
        b = ndimage.binary_dilation(rng.random((18, 20, 22)) < 0.01, iterations=2)
        assert hd95(a, b, spacing, "pooled") == binary.hd95(a, b, voxelspacing=spacing)


def test_hd95_of_a_shifted_cube_is_the_shift_under_every_definition():
    spacing = (2.5, 1.1, 0.8)
    ref = _cube(np.zeros((20, 20, 20), bool), (4, 4, 4), (8, 8, 8))
    pred = np.roll(ref, 2, axis=2)  # shifted by 2 x 0.8 mm along x
    for definition in ("surface-weighted", "pooled", "monai"):
        assert hd95(pred, ref, spacing, definition) == pytest.approx(1.6), definition
    with pytest.raises(ValueError, match="non-empty"):
        hd95(pred, np.zeros_like(ref), spacing)


# ----------------------------------------------------------------------------- evaluate / CLI

def test_evaluate_folder_and_cli_carry_both_blocks(tmp_path, capsys):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    ref = np.zeros((24, 24, 24), np.uint8)
    ref[4:14, 4:14, 4:14] = 2
    ref[6:12, 6:12, 6:12] = 3
    pred = ref.copy()
    pred[18:21, 18:21, 18:21] = 2   # a false-positive oedema blob
    for name, array, folder in (("A", ref, ref_dir), ("A", pred, pred_dir)):
        image = sitk.GetImageFromArray(array)
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    summary = evaluate_folder(pred_dir, ref_dir, "brats2023", metrics="both")
    assert summary["metrics"] == "both" and summary["regions"]["WT"]["dice"]["mean"] == pytest.approx(2000 / 2027)
    lw = summary["lesionwise"]
    assert lw["regions"]["WT"]["dice"]["mean"] == 0.5 and lw["regions"]["WT"]["hd95"]["mean"] == 187.0
    assert lw["regions"]["WT"]["counts"] == {"lesions": 1, "kept": 1, "tp": 1, "missed": 0, "fp": 1}
    assert lw["regions"]["ET"]["dice"]["mean"] == 1.0 and lw["average"]["dice"] == pytest.approx((0.5 + 1 + 1) / 3)
    table = format_table(summary)
    assert "whole volume (legacy), convention brats2023" in table and "lesion-wise" in table
    csv_path, json_path = write_results(summary, tmp_path / "out")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["region"] for r in rows] == ["WT", "TC", "ET"]
    assert rows[0]["lesionwise_dice"] == "0.500000" and rows[0]["fp"] == "1" and rows[0]["empty_mask"] == "none"
    saved = json.loads(json_path.read_text())
    assert saved["lesionwise"]["per_case"]["A"]["WT"]["lesion_list"][0]["volume_mm3"] == 1000.0

    only = evaluate_folder(pred_dir, ref_dir, metrics="lesionwise")
    assert "regions" not in only and only["lesionwise"]["regions"]["WT"]["counts"]["fp"] == 1
    assert main(["brats2023", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-j", "1",
                 "--metrics", "legacy", "--convention", "monai", "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "lesion-wise" not in printed and "monai" in printed
    saved = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert "lesionwise" not in saved and saved["convention"]["hd95"] == "monai"
    with pytest.raises(SystemExit):
        main(["brats2023", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--metrics", "lesion"])
