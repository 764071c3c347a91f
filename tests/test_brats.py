"""BraTS 2023 tooling: synthetic data, conversion to nnU-Net, metrics, CLI (CPU, small volumes)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from nnunet_mamba.brats import CHANNEL_ORDER, MODALITIES, REGIONS
from nnunet_mamba.brats.convert import (
    InvalidBratsDataError,
    PAPER_FOLD,
    convert_brats,
    cross_validation_folds,
    nnunet_splits,
    split_cases,
)
from nnunet_mamba.brats.layout import case_file_name, expected_files
from nnunet_mamba.brats.metrics import CONVENTIONS, evaluate_case, evaluate_folder, region_metrics, write_results
from nnunet_mamba.brats.synth import synthesize_case, synthesize_dataset
from nnunet_mamba.cli import main
from nnunet_mamba.errors import UserError

SHAPE = (40, 40, 32)  # x, y, z
N_CASES = 10


@pytest.fixture(scope="module")
def synth_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("brats_src")
    synthesize_dataset(out, N_CASES, SHAPE, seed=7)
    return out


def _read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _copy_cases(src: Path, dst: Path, n: int = 6) -> Path:
    for case in sorted(p.name for p in src.iterdir())[:n]:
        shutil.copytree(src / case, dst / case)
    return dst


# ----------------------------------------------------------------------------- synth

def test_synth_layout_geometry_and_nested_labels(synth_src):
    cases = sorted(p.name for p in synth_src.iterdir())
    assert cases == [f"BraTS-GLI-{i:05d}-000" for i in range(N_CASES)]
    cross = ndimage.generate_binary_structure(3, 1)
    for case in cases[:4]:
        names = sorted(p.name for p in (synth_src / case).iterdir())
        assert names == sorted(f"{case}-{s}.nii.gz" for s in ("t1c", "t1n", "t2f", "t2w", "seg"))
        seg_img, seg = _read(synth_src / case / case_file_name(case, "seg"))
        assert seg_img.GetSize() == SHAPE and seg_img.GetSpacing() == (1.0, 1.0, 1.0)
        assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1, 2, 3}
        images = {}
        for m in MODALITIES:
            img, arr = _read(synth_src / case / case_file_name(case, m))
            assert img.GetSize() == SHAPE and img.GetSpacing() == seg_img.GetSpacing()
            assert img.GetOrigin() == seg_img.GetOrigin() and img.GetDirection() == seg_img.GetDirection()
            assert arr.dtype == np.int16 and arr.min() >= 0
            images[m] = arr.astype(float)
        brain = images["t1n"] > 0
        assert brain[seg > 0].all(), "tumour outside the brain"
        assert not brain[0].any() and not brain[:, 0].any(), "background must be 0 at the image border"
        # nesting, voxel-exact: necrosis is enclosed by ET, the core by tumour
        assert set(np.unique(seg[ndimage.binary_dilation(seg == 1, cross)])) <= {1, 3}
        assert set(np.unique(seg[ndimage.binary_dilation(np.isin(seg, (1, 3)), cross)])) <= {1, 2, 3}
        # contrasts as in real scans
        healthy = brain & (seg == 0)
        mean = {m: {lab: images[m][seg == lab].mean() for lab in (1, 2, 3)} | {0: images[m][healthy].mean()}
                for m in MODALITIES}
        assert mean["t1c"][3] > 1.15 * mean["t1c"][0] and mean["t1c"][3] > mean["t1c"][1]  # ET enhances
        assert mean["t2f"][2] > 1.4 * mean["t2f"][0] and mean["t2w"][2] > 1.2 * mean["t2w"][0]  # oedema bright
        assert mean["t1n"][2] < mean["t1n"][0]  # oedema dark on T1


def test_synth_is_deterministic_per_seed():
    a_img, a_seg = synthesize_case((24, 24, 20), np.random.default_rng([3, 0]))
    b_img, b_seg = synthesize_case((24, 24, 20), np.random.default_rng([3, 0]))
    c_img, c_seg = synthesize_case((24, 24, 20), np.random.default_rng([4, 0]))
    assert np.array_equal(a_seg, b_seg) and all(np.array_equal(a_img[m], b_img[m]) for m in MODALITIES)
    assert not np.array_equal(a_seg, c_seg)


# ----------------------------------------------------------------------------- convert

def test_split_proportions_determinism_and_folds():
    cases = [f"BraTS-GLI-{i:05d}-000" for i in range(1251)]
    split = split_cases(cases, seed=12345)
    assert (len(split.train), len(split.val), len(split.test)) == (876, 125, 250)
    assert split_cases(list(reversed(cases)), seed=12345) == split  # depends on the set, not the order
    assert split_cases(cases, seed=1).test != split.test
    assert not (set(split.train) & set(split.val)) and not (set(split.test) & set(split.train + split.val))
    folds = nnunet_splits(split)
    assert len(folds) == PAPER_FOLD + 1
    vals = [set(f["val"]) for f in folds[:5]]
    assert set().union(*vals) == set(split.train + split.val) and sum(map(len, vals)) == 1001
    for f in folds[:5]:
        assert not set(f["train"]) & set(f["val"]) and len(f["train"]) + len(f["val"]) == 1001
        assert not set(split.test) & (set(f["train"]) | set(f["val"]))
    assert folds[PAPER_FOLD] == {"train": list(split.train), "val": list(split.val)}
    assert cross_validation_folds(split.train + split.val, 12345) == folds[:5]
    with pytest.raises(UserError, match="too few"):
        split_cases(cases[:5])


def test_convert_writes_valid_nnunet_dataset(synth_src, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    result = convert_brats(synth_src, 7, name="BraTSTest", nnunet_raw=raw, nnunet_preprocessed=pre)
    ds = raw / "Dataset007_BraTSTest"
    assert result.dataset_dir == ds and sorted(p.name for p in raw.iterdir()) == [ds.name]
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
    assert dj["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3],
                            "enhancing tumor": [3]}
    assert dj["regions_class_order"] == [2, 1, 3] and dj["file_ending"] == ".nii.gz"
    split = result.split
    assert (len(split.train), len(split.val), len(split.test)) == (7, 1, 2)
    assert dj["numTraining"] == 8
    assert split == split_cases([f"BraTS-GLI-{i:05d}-000" for i in range(N_CASES)], 12345)
    for part, cases in (("Tr", split.train + split.val), ("Ts", split.test)):
        expected_images = sorted(f"{c}_{i:04d}.nii.gz" for c in cases for i in range(4))
        assert sorted(p.name for p in (ds / f"images{part}").iterdir()) == expected_images
        assert sorted(p.name for p in (ds / f"labels{part}").iterdir()) == sorted(f"{c}.nii.gz" for c in cases)
    case = split.test[0]
    for i, modality in enumerate(CHANNEL_ORDER):  # channel i is modality CHANNEL_ORDER[i]
        link = ds / "imagesTs" / f"{case}_{i:04d}.nii.gz"
        assert link.is_symlink() and Path(os.readlink(link)) == (synth_src / case /
                                                                 case_file_name(case, modality)).resolve()
    assert result.files == "symlink"
    splits = json.loads((ds / "splits_final.json").read_text())
    assert json.loads((pre / ds.name / "splits_final.json").read_text()) == splits
    assert len(splits) == 6
    vals = [set(f["val"]) for f in splits[:5]]
    assert set().union(*vals) == set(split.train + split.val) and sum(map(len, vals)) == 8
    assert all(not set(split.test) & (set(f["train"]) | set(f["val"])) for f in splits)
    record = json.loads((ds / "split.json").read_text())
    assert record["seed"] == 12345 and record["test"] == list(split.test)
    assert record["fractions"] == {"train": 0.7, "val": 0.1, "test": 0.2}

    # no overwrite without --overwrite; the same ID under another name is refused
    with pytest.raises(UserError, match="already exists"):
        convert_brats(synth_src, 7, name="BraTSTest", nnunet_raw=raw, nnunet_preprocessed=pre)
    with pytest.raises(UserError, match="already used"):
        convert_brats(synth_src, 7, name="Other", nnunet_raw=raw, nnunet_preprocessed=pre)
    # --copy --overwrite with another seed replaces it
    result = convert_brats(synth_src, 7, name="BraTSTest", mode="copy", seed=3, overwrite=True,
                           nnunet_raw=raw, nnunet_preprocessed=pre)
    assert result.files == "copy" and not (ds / "imagesTr").iterdir().__next__().is_symlink()
    assert json.loads((ds / "split.json").read_text())["seed"] == 3
    assert sorted(p.name for p in raw.iterdir()) == [ds.name]


def _rewrite(path, array=None, **geometry):
    image = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) if array is None else array)
    new.SetSpacing(geometry.get("spacing", image.GetSpacing()))
    new.SetOrigin(image.GetOrigin())
    new.SetDirection(image.GetDirection())
    sitk.WriteImage(new, str(path), True)


def _defect(kind, case_dir: Path) -> Path:
    """Damage one case; returns the file that the error must name."""
    case = case_dir.name
    files = {s: case_dir / n for s, n in expected_files(case).items()}
    if kind == "missing modality":
        files["t2f"].unlink()
        return files["t2f"]
    if kind == "extra modality file":
        extra = case_dir / f"{case}-flair.nii.gz"
        shutil.copy(files["t2f"], extra)
        return extra
    if kind == "shape mismatch":
        _rewrite(files["t1n"], sitk.GetArrayFromImage(sitk.ReadImage(str(files["t1n"])))[:-1])
        return files["t1n"]
    if kind == "spacing mismatch":
        _rewrite(files["t2w"], spacing=(1.0, 1.0, 1.2))
        return files["t2w"]
    if kind == "label 4":
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(files["seg"])))
        seg[seg == 3] = 4
        _rewrite(files["seg"], seg)
        return files["seg"]
    if kind == "corrupt file":
        files["t1c"].write_bytes(b"\x1f\x8b this is not a NIfTI file" * 8)
        return files["t1c"]
    if kind == "NaN voxels":
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(files["t1n"]))).astype(np.float32)
        arr[10, 20, 20] = np.nan
        _rewrite(files["t1n"], arr)
        return files["t1n"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing modality", "extra modality file", "shape mismatch", "spacing mismatch",
                                  "label 4", "corrupt file", "NaN voxels"])
def test_convert_rejects_bad_case_and_writes_nothing(kind, synth_src, tmp_path):
    src = _copy_cases(synth_src, tmp_path / "src")
    bad_case = src / "BraTS-GLI-00002-000"
    bad_file = _defect(kind, bad_case)
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    with pytest.raises(InvalidBratsDataError) as info:
        convert_brats(src, 11, nnunet_raw=raw, nnunet_preprocessed=pre)
    message = str(info.value)
    assert bad_case.name in message and str(bad_file) in message and "fix:" in message
    assert [p.case for p in info.value.problems] == [bad_case.name]
    assert not raw.exists() or not any(raw.iterdir()), "a dataset (or a temporary folder) was left behind"
    assert not pre.exists() or not any(pre.iterdir())


def test_convert_reports_all_bad_cases_through_cli(synth_src, tmp_path, capsys):
    src = _copy_cases(synth_src, tmp_path / "src")
    f1 = _defect("label 4", src / "BraTS-GLI-00001-000")
    f2 = _defect("missing modality", src / "BraTS-GLI-00004-000")
    raw = tmp_path / "raw"
    rc = main(["brats2023", "convert", str(src), "-d", "12", "--nnunet-raw", str(raw),
               "--nnunet-preprocessed", str(tmp_path / "pre"), "-j", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and str(f1) in err and str(f2) in err and "map 4 -> 3" in err
    assert not raw.exists() or not any(raw.iterdir())


# ----------------------------------------------------------------------------- metrics

def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def _brute_force_hd95(a, b, spacing):
    """Symmetric HD95 from scratch: edge voxels (mask minus its erosion), KD-tree distances in mm."""
    def edge_points(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)
    pa, pb = edge_points(a), edge_points(b)
    d_ab = cKDTree(pb).query(pa)[0]
    d_ba = cKDTree(pa).query(pb)[0]
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def test_metrics_identical_spheres():
    labels = _ball((30, 30, 30), (15, 15, 15), 8).astype(np.uint8) * 2
    labels[_ball((30, 30, 30), (15, 15, 15), 4)] = 3
    m = region_metrics(labels, labels.copy(), (1.0, 1.0, 1.0), "brats2023")
    for region in REGIONS:
        assert m[region]["dice"] == 1.0 and m[region]["hd95"] == 0.0 and m[region]["empty"] == "none"


@pytest.mark.parametrize("axis,k", [(0, 2), (2, 3)])
def test_hd95_of_shifted_plate_is_shift_times_spacing(axis, k, tmp_path):
    """A one-voxel-thick plate shifted by k voxels across its thickness: every edge distance is k * spacing."""
    spacing_zyx = (2.5, 1.1, 0.8)
    ref = np.zeros((24, 24, 24), np.uint8)
    index = [slice(6, 14)] * 3
    index[axis] = 8
    ref[tuple(index)] = 2
    pred = np.roll(ref, k, axis=axis)
    m = region_metrics(pred, ref, spacing_zyx)
    assert m["WT"]["hd95"] == pytest.approx(k * spacing_zyx[axis], rel=1e-6)
    assert m["WT"]["dice"] == 0.0
    # through files: SimpleITK spacing is (x, y, z); the evaluation must reverse it
    for name, arr in (("pred", pred), ("ref", ref)):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing(tuple(reversed(spacing_zyx)))
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    rows = evaluate_case("c", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", "brats2023")
    assert rows[0]["region"] == "WT" and rows[0]["hd95"] == pytest.approx(k * spacing_zyx[axis], rel=1e-6)
    # TC and ET are empty in both (the plate is oedema only): Dice 1, HD95 0 under brats2023
    assert [(r["region"], r["dice"], r["hd95"], r["empty"]) for r in rows[1:]] == [
        ("TC", 1.0, 0.0, "both"), ("ET", 1.0, 0.0, "both")]


def test_shifted_sphere_dice_by_counting_and_hd95_by_brute_force():
    shape, k, spacing_zyx = (36, 36, 36), 3, (2.0, 1.0, 0.7)
    ref = _ball(shape, (18, 18, 18), 7)
    pred = np.zeros_like(ref)
    pred[k:] = ref[:-k]  # shift by k voxels along z (axis 0)
    overlap = int(np.count_nonzero(ref[k:] & ref[:-k]))
    m = region_metrics(pred.astype(np.uint8) * 3, ref.astype(np.uint8) * 3, spacing_zyx, "monai")
    assert m["ET"]["dice"] == pytest.approx(2 * overlap / (2 * ref.sum()))
    expected = _brute_force_hd95(pred, ref, spacing_zyx)
    assert m["ET"]["hd95"] == pytest.approx(expected, rel=1e-5)
    assert 0 < m["ET"]["hd95"] <= k * spacing_zyx[0] + 1e-6
    # the spacing must matter along the shift axis only
    m_iso = region_metrics(pred.astype(np.uint8) * 3, ref.astype(np.uint8) * 3, (2.0, 1.0, 1.0), "monai")
    assert m_iso["ET"]["hd95"] == pytest.approx(_brute_force_hd95(pred, ref, (2.0, 1.0, 1.0)), rel=1e-5)


@pytest.mark.parametrize("convention,both,one", [("brats2023", (1.0, 0.0), (0.0, 374.0)),
                                                 ("nnunet-v1", (1.0, 0.0), (0.0, 373.12866)),
                                                 ("segmamba", (0.0, 50.0), (0.0, 50.0))])
def test_empty_mask_conventions(convention, both, one):
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:12, 5:12, 5:12] = 2       # oedema only: TC and ET empty in the reference
    pred = ref.copy()
    pred[8, 8, 8] = 3               # prediction has a (false) ET voxel, TC then non-empty too
    m = region_metrics(pred, ref, (1, 1, 1), convention)
    assert (m["TC"]["dice"], m["TC"]["hd95"]) == one and m["TC"]["empty"] == "ref"
    assert (m["ET"]["dice"], m["ET"]["hd95"]) == one
    m = region_metrics(ref, ref, (1, 1, 1), convention)
    assert (m["ET"]["dice"], m["ET"]["hd95"]) == both and m["ET"]["empty"] == "both"
    assert m["WT"]["dice"] == 1.0 and m["WT"]["hd95"] == 0.0
    assert CONVENTIONS[convention].name == convention


def _write_labels(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_evaluate_folder_summary_and_errors(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[4:14, 4:14, 4:14] = 2
    ref[6:12, 6:12, 6:12] = 3
    ref[8:10, 8:10, 8:10] = 1
    no_et = ref.copy()
    no_et[no_et == 3] = 1
    for case, pred in (("A", ref), ("B", no_et), ("C", ref)):
        _write_labels(ref_dir / f"{case}.nii.gz", ref)
        _write_labels(pred_dir / f"{case}.nii.gz", pred)
    _write_labels(pred_dir / "extra.nii.gz", ref)
    summary = evaluate_folder(pred_dir, ref_dir, "nnunet-v1", n_jobs=2)
    assert summary == {**evaluate_folder(pred_dir, ref_dir, "nnunet-v1", n_jobs=1)}
    assert summary["n_cases"] == 3 and summary["ignored_predictions"] == ["extra"]
    assert summary["convention"]["name"] == "nnunet-v1" and summary["library"].startswith("pooled, 1 mm")
    et = summary["regions"]["ET"]
    assert et["dice"]["mean"] == pytest.approx(2 / 3) and et["hd95"]["mean"] == pytest.approx(373.12866 / 3)
    assert et["n_empty"] == {"both": 0, "pred": 1, "ref": 0}
    assert summary["regions"]["WT"]["dice"] == {"mean": 1.0, "std": 0.0}
    assert summary["average"]["dice"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert summary["per_case"]["B"]["ET"] == {"dice": 0.0, "hd95": 373.12866, "empty": "pred"}
    csv_path, json_path = write_results(summary, tmp_path / "out")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ("case,region,dice,hd95,empty_mask,lesionwise_dice,lesionwise_hd95,lesions,kept,tp,missed,fp"
                        ) and len(lines) == 1 + 3 * 3
    assert json.loads(json_path.read_text())["convention"]["one_empty_hd95"] == 373.12866

    # a missing prediction, a bad label, a grid mismatch: errors naming the case / file
    (pred_dir / "C.nii.gz").unlink()
    with pytest.raises(UserError, match="no prediction.*C"):
        evaluate_folder(pred_dir, ref_dir)
    bad = ref.copy()
    bad[0, 0, 0] = 5
    _write_labels(pred_dir / "C.nii.gz", bad)
    with pytest.raises(UserError, match=r"C\.nii\.gz holds label\(s\) 5"):
        evaluate_folder(pred_dir, ref_dir)
    _write_labels(pred_dir / "C.nii.gz", ref, spacing=(1.0, 1.0, 2.0))
    with pytest.raises(UserError, match=r"C\.nii\.gz does not lie on the grid.*spacing"):
        evaluate_folder(pred_dir, ref_dir)


# ----------------------------------------------------------------------------- CLI

def test_cli_synth_convert_evaluate(tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["brats2023", "synth", str(src), "--cases", "6", "--shape", "24", "24", "20", "--seed", "1"]) == 0
    assert len(list(src.iterdir())) == 6
    assert main(["brats2023", "convert", str(src), "-d", "3", "--nnunet-raw", str(tmp_path / "raw"),
                 "--nnunet-preprocessed", str(tmp_path / "pre"), "-j", "1"]) == 0
    labels_ts = tmp_path / "raw" / "Dataset003_BraTS2023GLI" / "labelsTs"
    assert main(["brats2023", "evaluate", "--pred", str(labels_ts), "--ref", str(src), "-j", "1",
                 "--convention", "segmamba", "--out", str(tmp_path / "ev")]) == 2  # src holds all 6 cases
    assert "have no prediction" in capsys.readouterr().err
    assert main(["brats2023", "evaluate", "--pred", str(labels_ts), "--ref", str(labels_ts), "-j", "1",
                 "--convention", "segmamba", "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["convention"]["name"] == "segmamba" and summary["average"]["dice"] == 1.0
    assert main(["brats2023", "synth", str(src), "--cases", "2", "--shape", "24", "24", "20"]) == 2


# ----------------------------------------------------------------------------- UNETR trainer

def _plans(patch_size):
    norm = ["ZScoreNormalization"] * 4
    return {
        "dataset_name": "Dataset501_BraTS2023GLI", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch_size), "median_image_size_in_voxels": [64, 64, 64],
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": norm, "use_mask_for_norm": [True] * 4,
            "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
            "batch_dice": False}},
    }


def _brats_dataset_json():
    from nnunet_mamba.brats.convert import dataset_json
    return dataset_json(8, "BraTS2023GLI")


def test_unetr_trainer_is_found_and_runs_forward(tmp_path, monkeypatch):
    import torch
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cls = recursive_find_trainer_class_by_name("UNETRTrainer")
    assert cls is not None and cls.__name__ == "UNETRTrainer"
    for variant, epochs in (("UNETRTrainer_1epoch", 1), ("UNETRTrainer_5epochs", 5)):
        assert recursive_find_trainer_class_by_name(variant).hyperparameters["num_epochs"] == epochs

    pm = PlansManager(_plans((32, 32, 32)))
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = cls.build_network_architecture(pm, cm, 4, 3, enable_deep_supervision=True)
    assert type(net).__name__ == "UNETR" and type(net).__module__.startswith("monai.")
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 32, 32) and torch.isfinite(out).all()

    # the trainer: no deep supervision anywhere, region loss, AdamW 1e-4 / 1e-5
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    plans = _plans((32, 32, 32))
    plans["continue_training"] = False
    trainer = cls(plans, "3d_fullres", 0, _brats_dataset_json(), device=torch.device("cpu"))
    assert trainer.enable_deep_supervision is False and trainer._get_deep_supervision_scales() is None
    loss = trainer._build_loss()
    assert not isinstance(loss, DeepSupervisionWrapper) and type(loss).__name__ == "DC_and_BCE_loss"
    trainer.network = net
    trainer.set_deep_supervision_enabled(True)  # a no-op, must not touch net.decoder
    optimizer, _ = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 1e-4 and optimizer.param_groups[0]["weight_decay"] == 1e-5
    target = (torch.rand(1, 3, 32, 32, 32) > 0.5).float()
    value = loss(net(x), target)
    value.backward()
    assert torch.isfinite(value) and net.out.conv.conv.weight.grad is not None


def test_unetr_rejects_patch_size_not_divisible_by_16():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mamba_trainers.trainers_unetr import UNETRTrainer

    pm = PlansManager(_plans((28, 32, 28)))
    with pytest.raises(ValueError, match=r"\[28, 32, 28\].*nnUNetPlans.*Dataset501_BraTS2023GLI.*divisible by 16"
                                         r".*Fix: .*patch_size.*\[32, 32, 32\]"):
        UNETRTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 4, 3)
