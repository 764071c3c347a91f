"""Bad input and faults (issue 14): nothing silently wrong, nothing lost, no code run from data.

Tiny synthetic files in tmp_path; every test checks the refusal's message (file + fix) or
that nothing was lost. docs/reliability.md lists what each case gets.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_mamba import imaging, safe_io
from nnunet_mamba.cli import main
from nnunet_mamba.errors import UserError
from nnunet_mamba.imaging import ImageError, read_image

PACKAGE = Path(__file__).resolve().parents[1] / "nnunet_mamba"


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return Path(path)


def _noise(shape=(16, 16, 16), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _cut(path, fraction):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])
    return Path(path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- the one image reader

@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, name):
    path = _cut(_write(tmp_path / name, _noise()), 0.6)
    with pytest.raises(ImageError, match="truncated") as info:
        read_image(path)
    assert str(path) in str(info.value) and "re-download" in str(info.value)
    assert info.value.kind == "truncated"


def test_nonfinite_voxels_are_refused_in_nifti_and_other_formats(tmp_path):
    array = _noise()
    array[3, 4, 5] = np.nan
    array[6, 7, 8] = np.inf
    for name in ("nan.nii.gz", "nan.mha"):
        path = _write(tmp_path / name, array)
        with pytest.raises(ImageError, match=r"2 NaN/inf voxel\(s\).*without NaN/inf") as info:
            read_image(path)
        assert str(path) in str(info.value)
    assert read_image(tmp_path / "nan.nii.gz", allow_nonfinite=True).GetSize() == (16, 16, 16)


def test_non_3d_unreadable_and_non_files_are_refused(tmp_path):
    with pytest.raises(ImageError, match="2D image"):
        read_image(_write(tmp_path / "flat.nii.gz", _noise((16, 16))))
    vector = sitk.GetImageFromArray(np.zeros((4, 4, 4, 3), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vec.nii.gz"))
    with pytest.raises(ImageError, match="vector image with 3 components"):
        read_image(tmp_path / "vec.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.nii.gz") as info:
        read_image(tmp_path / "junk.nii.gz")
    assert info.value.kind in ("truncated", "unreadable")
    os.symlink("loop.nii.gz", tmp_path / "loop.nii.gz")
    with pytest.raises(ImageError, match="symlink loop"):
        read_image(tmp_path / "loop.nii.gz")
    with pytest.raises(ImageError, match="not a regular file"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="3D volume"):
        imaging.read_header(tmp_path / "flat.nii.gz")


def test_no_module_reads_images_or_checkpoints_around_the_checks():
    """Only imaging.py reads image files; every torch.load passes weights_only=True."""
    readers = {"ReadImage", "ImageFileReader", "ReadImageInformation"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if path.name != "imaging.py" and (name in readers or (owner in ("nib", "nibabel") and name == "load")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
            if name == "load" and owner == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} torch.load without weights_only=True")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- commands that read images

@pytest.fixture(scope="module")
def brats_src(tmp_path_factory):
    from nnunet_mamba.brats.synth import synthesize_dataset

    src = tmp_path_factory.mktemp("brats") / "src"
    synthesize_dataset(src, 6, (16, 16, 16), seed=3)
    return src


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_convert_refuses_a_truncated_segmentation(brats_src, tmp_path):
    from nnunet_mamba.brats.convert import InvalidBratsDataError, convert_brats

    src = _copy_tree(brats_src, tmp_path / "src")
    case = sorted(src.iterdir())[1]
    seg = next(case.glob("*-seg.nii.gz"))
    _cut(seg, 0.5)
    with pytest.raises(InvalidBratsDataError) as info:
        convert_brats(src, 21, nnunet_raw=tmp_path / "raw", nnunet_preprocessed=tmp_path / "pre")
    assert str(seg) in str(info.value) and "truncated" in str(info.value) and "fix:" in str(info.value)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def _labels(path, array):
    return _write(path, array.astype(np.uint8))


def test_evaluate_refuses_truncated_prediction_and_marks_empty_mask_values(tmp_path, capsys):
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[3:12, 3:12, 3:12] = 2
    ref[5:10, 5:10, 5:10] = 1
    ref[6:9, 6:9, 6:9] = 3
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    _labels(ref_dir / "c1.nii.gz", ref)
    _cut(_labels(pred_dir / "c1.nii.gz", ref), 0.6)
    rc = main(["brats2023", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-j", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "prediction" in err and str(pred_dir / "c1.nii.gz") in err and "truncated" in err
    # a valid prediction; the second case has no ET anywhere (empty-mask convention)
    _labels(pred_dir / "c1.nii.gz", ref)
    no_et = np.where(ref == 3, 1, ref)
    _labels(ref_dir / "c2.nii.gz", no_et)
    _labels(pred_dir / "c2.nii.gz", no_et)
    out = tmp_path / "metrics"
    assert main(["brats2023", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-j", "1",
                 "--out", str(out)]) == 0
    with open(out / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    marks = {(r["case"], r["region"]): r["empty_mask"] for r in rows}
    assert marks[("c2", "ET")] == "both" and marks[("c1", "ET")] == "none" and marks[("c2", "WT")] == "none"
    # outputs exist: refused without --overwrite, before computing
    capsys.readouterr()
    assert main(["brats2023", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-j", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--overwrite" in err
    # --out naming an existing file: refused (before the metrics are computed)
    assert main(["brats2023", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-j", "1",
                 "--out", str(ref_dir / "c1.nii.gz")]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_evaluate_never_writes_through_a_symlink(tmp_path, capsys):
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[4:9, 4:9, 4:9] = 2
    pred_dir, ref_dir, elsewhere = tmp_path / "pred", tmp_path / "ref", tmp_path / "elsewhere"
    for d in (pred_dir, ref_dir, elsewhere):
        d.mkdir()
    _labels(ref_dir / "c1.nii.gz", ref)
    _labels(pred_dir / "c1.nii.gz", ref)
    precious = elsewhere / "precious.txt"
    precious.write_text("keep me")
    # a symlink planted at the default output folder inside the prediction folder
    os.symlink(elsewhere, pred_dir / "brats2023_metrics_brats2023")
    assert main(["brats2023", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-j", "1"]) == 2
    assert "is a symlink" in capsys.readouterr().err
    # a symlink planted at an output file: replaced by the file, its target untouched
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(precious, out / "per_case.csv")
    assert main(["brats2023", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-j", "1",
                 "--out", str(out), "--overwrite"]) == 0
    assert precious.read_text() == "keep me"
    assert not (out / "per_case.csv").is_symlink() and "empty_mask" in (out / "per_case.csv").read_text()


def test_nifti_beside_nifti_gz_is_refused(tmp_path):
    from nnunet_mamba.brats.metrics import find_prediction_cases
    from nnunet_mamba.landmarks.io import list_images

    _labels(tmp_path / "A.nii.gz", np.zeros((4, 4, 4)))
    _labels(tmp_path / "A.nii", np.zeros((4, 4, 4)))
    with pytest.raises(UserError, match=r"A.nii and A.nii.gz|A.nii.gz and A.nii"):
        find_prediction_cases(tmp_path)
    with pytest.raises(UserError, match="two images for case 'A'"):
        list_images(tmp_path)


def test_cls_and_landmarks_refuse_nan_voxels(tmp_path):
    from nnunet_mamba.classification.preprocessing import PreprocessingConfig, preprocess_case
    from nnunet_mamba.landmarks.data import read_image as landmark_image

    array = _noise()
    array[2, 2, 2] = np.nan
    path = _write(tmp_path / "nan.nii.gz", array)
    with pytest.raises(UserError, match=r"nan.nii.gz: 1 NaN/inf voxel"):
        preprocess_case([path], PreprocessingConfig(size=(16, 16, 16)))
    with pytest.raises(UserError, match=r"case 'c7': .*nan.nii.gz: 1 NaN/inf voxel"):
        landmark_image(path, "c7")
    with pytest.raises(UserError, match="truncated"):
        landmark_image(_cut(_write(tmp_path / "t.nii.gz", _noise()), 0.6), "c8")


# ----------------------------------------------------------------------------- checkpoints and model folders

class _Payload:
    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _cls_model(folder: Path, checkpoint_rel: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    plans = {"folds": [{"fold": 0, "checkpoint": checkpoint_rel, "threshold": 0.5}], "classes": ["a", "b"],
             "id_column": "subject", "image_columns": ["image"], "preprocessing": {}}
    (folder / "plans.json").write_text(json.dumps(plans))
    return plans


def test_cls_checkpoints_cannot_run_code_or_leave_the_model_folder(tmp_path):
    from nnunet_mamba.classification.predict import load_fold_models, load_plans

    model = tmp_path / "model"
    plans = _cls_model(model, "fold_0/checkpoint.pt")
    (model / "fold_0").mkdir()
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned.txt")
    torch.save({"state_dict": {}, "model": "nnmamba", "evil": payload}, model / "fold_0" / "checkpoint.pt")
    with pytest.raises(UserError, match="not a checkpoint of 'nnmamba cls train'"):
        load_fold_models(model, plans, torch.device("cpu"))
    assert not (tmp_path / "pwned.txt").exists(), "a pickled payload ran"
    # paths of the model folder stay inside it: '../', absolute and symlinked paths are refused
    outside = tmp_path / "outside.pt"
    torch.save({"state_dict": {}}, outside)
    os.symlink(outside, model / "fold_0" / "link.pt")
    for rel in ("../outside.pt", str(outside), "fold_0/link.pt"):
        plans = _cls_model(model, rel)
        with pytest.raises(UserError, match="points outside the model folder"):
            load_fold_models(model, load_plans(model), torch.device("cpu"))
    # duplicate keys in plans.json
    (model / "plans.json").write_text('{"folds": [], "folds": [{"fold": 0}]}')
    with pytest.raises(UserError, match="'folds' appears twice"):
        load_plans(model)


def test_landmark_checkpoint_payload_does_not_run(tmp_path):
    from nnunet_mamba.landmarks.inference import load_model

    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model": "resunet", "landmarks": ["a"], "model_kwargs": {}}))
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned.txt")
    torch.save({"state_dict": payload}, model / "fold_0" / "checkpoint_final.pt")
    with pytest.raises(UserError, match="not a checkpoint"):
        load_model(model, [0])
    assert not (tmp_path / "pwned.txt").exists()


# ----------------------------------------------------------------------------- convert --overwrite, stale folders

def test_convert_overwrite_removes_derived_nnunet_data_and_stale_folders(brats_src, tmp_path, monkeypatch):
    from nnunet_mamba.brats.convert import convert_brats

    monkeypatch.delenv("nnUNet_results", raising=False)
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    convert_brats(brats_src, 22, nnunet_raw=raw, nnunet_preprocessed=pre)
    ds = pre / "Dataset022_BraTS2023GLI"
    # what nnUNetv2_plan_and_preprocess would have made from this raw data
    (ds / "nnUNetPlans.json").write_text("{}")
    (ds / "gt_segmentations").mkdir()
    (ds / "nnUNetPlans_3d_fullres").mkdir()
    # leftovers of killed conversions
    dead = _dead_pid()
    (raw / f".Dataset022_BraTS2023GLI.incomplete-{dead}").mkdir()
    (raw / f".Dataset022_BraTS2023GLI.old-{dead}" / "imagesTr").mkdir(parents=True)
    (raw / f".Dataset022_BraTS2023GLI.incomplete-{os.getppid()}").mkdir()  # a live process: kept
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        convert_brats(brats_src, 22, nnunet_raw=raw, nnunet_preprocessed=pre)
    convert_brats(brats_src, 22, nnunet_raw=raw, nnunet_preprocessed=pre, overwrite=True, seed=7)
    assert sorted(p.name for p in ds.iterdir()) == ["splits_final.json"]
    assert json.loads((raw / "Dataset022_BraTS2023GLI" / "split.json").read_text())["seed"] == 7
    assert sorted(p.name for p in raw.iterdir()) == [f".Dataset022_BraTS2023GLI.incomplete-{os.getppid()}",
                                                      "Dataset022_BraTS2023GLI"]
    # raw data removed by hand, old plans still there: refused without --overwrite
    (ds / "nnUNetPlans.json").write_text("{}")
    import shutil

    shutil.rmtree(raw / "Dataset022_BraTS2023GLI")
    with pytest.raises(UserError, match="nnUNetPlans.json from an earlier conversion"):
        convert_brats(brats_src, 22, nnunet_raw=raw, nnunet_preprocessed=pre, seed=7)
    # models trained on the old data: --overwrite refuses while they are there
    results = tmp_path / "results"
    (results / "Dataset022_BraTS2023GLI" / "nnMambaTrainer__nnUNetPlans__3d_fullres").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_results", str(results))
    with pytest.raises(UserError, match="models trained on the dataset"):
        convert_brats(brats_src, 22, nnunet_raw=raw, nnunet_preprocessed=pre, overwrite=True)


def test_convert_refuses_source_inside_target_and_symlink_loops(brats_src, tmp_path, capsys):
    from nnunet_mamba.brats.convert import convert_brats

    raw = tmp_path / "raw"
    inner = _copy_tree(brats_src, raw / "Dataset023_BraTS2023GLI" / "src")
    with pytest.raises(UserError, match="lies in"):
        convert_brats(inner, 23, nnunet_raw=raw, nnunet_preprocessed=tmp_path / "pre", overwrite=True)
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    rc = main(["brats2023", "convert", str(tmp_path / "loop"), "-d", "24", "--nnunet-raw", str(raw),
               "--nnunet-preprocessed", str(tmp_path / "pre")])
    assert rc == 2 and "is a symlink loop" in capsys.readouterr().err
    src = _copy_tree(brats_src, tmp_path / "src")
    os.symlink(src / "BraTS-GLI-00099-000", src / "BraTS-GLI-00099-000")
    rc = main(["brats2023", "convert", str(src), "-d", "24", "--nnunet-raw", str(raw),
               "--nnunet-preprocessed", str(tmp_path / "pre"), "-j", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "BraTS-GLI-00099-000" in err and "Too many levels of symbolic links" in err


# ----------------------------------------------------------------------------- safe writes

def test_atomic_write_replaces_symlinks_refuses_existing_and_cleans_up(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    os.symlink(precious, tmp_path / "out.txt")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        safe_io.atomic_write_text(tmp_path / "out.txt", "new")
    safe_io.atomic_write_text(tmp_path / "out.txt", "new", overwrite=True)
    assert precious.read_text() == "keep" and (tmp_path / "out.txt").read_text() == "new"
    assert not (tmp_path / "out.txt").is_symlink()
    with pytest.raises(RuntimeError):
        with safe_io.atomic_open(tmp_path / "half.txt") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "precious.txt"]
    dead = _dead_pid()
    (tmp_path / f".out.txt.tmp-{dead}").write_text("x")
    (tmp_path / f".data.incomplete-{dead}").mkdir()
    (tmp_path / ".not-ours-123").mkdir()
    removed = safe_io.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == [f".data.incomplete-{dead}", f".out.txt.tmp-{dead}"]
    assert (tmp_path / ".not-ours-123").exists()


def test_check_output_file_kinds_and_inputs(tmp_path):
    inp = tmp_path / "in.csv"
    inp.write_text("x")
    with pytest.raises(UserError, match="is an input of this command"):
        safe_io.check_output_file(inp, overwrite=True, inputs=[inp])
    os.symlink(inp, tmp_path / "alias.csv")
    with pytest.raises(UserError, match="is an input of this command"):
        safe_io.check_output_file(tmp_path / "alias.csv", overwrite=True, inputs=[inp])
    with pytest.raises(UserError, match="is an existing folder"):
        safe_io.check_output_file(tmp_path, overwrite=True)
    with pytest.raises(UserError, match="already exists"):
        safe_io.check_output_file(inp, overwrite=False)
    assert safe_io.check_output_file(tmp_path / "new.csv", overwrite=False) == tmp_path / "new.csv"


def test_cls_predict_checks_out_before_any_work(tmp_path, capsys):
    model = tmp_path / "model"
    _cls_model(model, "fold_0/checkpoint.pt")
    table = tmp_path / "new.csv"
    table.write_text("subject,image\ns1,a.nii.gz\n")
    existing = tmp_path / "probs.csv"
    existing.write_text("previous results")
    base = ["cls", "predict", "--model", str(model), "--csv", str(table), "--device", "cpu"]
    assert main(base + ["--out", str(existing)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_text() == "previous results"
    assert main(base + ["--out", str(table), "--overwrite"]) == 2
    assert "is an input of this command" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path)]) == 2
    assert "is an existing folder" in capsys.readouterr().err
    assert main(base + ["--out", str(model / "p.csv")]) == 2
    assert "lies in the model folder" in capsys.readouterr().err


def test_landmarks_predict_never_replaces_reference_landmarks(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "landmarks").mkdir()
    _write(data / "images" / "c1.nii.gz", _noise())
    truth = data / "landmarks" / "c1.json"
    truth.write_text(json.dumps({"landmarks": {"a": [1, 2, 3]}}))
    # the model folder does not even exist: the output check comes first
    base = ["landmarks", "predict", "--model", str(tmp_path / "nomodel"), "--images", str(data)]
    assert main(base + ["--out", str(data / "landmarks")]) == 2
    err = capsys.readouterr().err
    assert "already holds c1.json" in err and "--overwrite" in err
    assert json.loads(truth.read_text())["landmarks"]["a"] == [1, 2, 3]
    assert main(base + ["--out", str(truth)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(base + ["--out", str(data / "images")]) == 2
    assert "is an input of this command" in capsys.readouterr().err
    assert main(["landmarks", "evaluate", "--pred", str(data / "landmarks"), "--ref", str(data)]) == 2
    assert "same landmark folder" in capsys.readouterr().err
    assert main(["landmarks", "train", "--data", str(data), "--out", str(truth)]) == 2
    assert "is an existing file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- smaller items

def test_duplicate_json_keys_are_refused(tmp_path):
    from nnunet_mamba.landmarks.io import read_landmarks

    path = tmp_path / "c.json"
    path.write_text('{"landmarks": {"a": [1, 2, 3], "a": [4, 5, 6]}}')
    with pytest.raises(UserError, match=r"c.json: key 'a' appears twice"):
        read_landmarks(path)


def _tiny_csv(tmp_path, rows):
    _write(tmp_path / "img.nii.gz", _noise((8, 8, 8)))
    path = tmp_path / "t.csv"
    path.write_text("subject,image,label\n" + "".join(f"{s},{i},{lab}\n" for s, i, lab in rows))
    return path


def test_cls_labels_written_two_ways_and_leaks_through_other_paths(tmp_path):
    from nnunet_mamba.classification.table import read_table

    for i in range(3):
        _write(tmp_path / f"i{i}.nii.gz", _noise((8, 8, 8), seed=i))
    path = tmp_path / "t.csv"
    path.write_text("subject,image,label\ns0,i0.nii.gz,1\ns1,i1.nii.gz,1.0\ns2,i2.nii.gz,0\n")
    with pytest.raises(UserError, match=r"\['1', '1.0'\].*one number written differently"):
        read_table(path)
    sub = tmp_path / "sub"
    sub.mkdir()
    os.symlink(tmp_path / "i0.nii.gz", tmp_path / "link.nii.gz")
    for other in (f"{sub}/../i0.nii.gz", str(tmp_path / "link.nii.gz")):
        path.write_text(f"subject,image,label\ns0,i0.nii.gz,0\ns1,{other},1\ns2,i2.nii.gz,1\n")
        with pytest.raises(UserError, match=r"belongs to subject 's0'.*the same file.*leak"):
            read_table(path)


def test_cls_threshold_range_and_class_count(tmp_path):
    from nnunet_mamba.classification.preprocessing import PreprocessingConfig
    from nnunet_mamba.classification.table import ClassificationTable
    from nnunet_mamba.classification.trainer import TrainSettings, cross_validate

    with pytest.raises(UserError, match=r"--threshold 1.5: a probability threshold lies in 0-1"):
        TrainSettings(threshold="1.5").check()
    table = ClassificationTable(tmp_path / "t.csv", [], ("image",), ("a", "b", "c"))
    with pytest.raises(UserError, match="applies to two classes"):
        cross_validate(table, PreprocessingConfig(), TrainSettings(threshold="0.5"), tmp_path / "out")
    (tmp_path / "file").write_text("x")
    table.classes = ("a", "b")
    with pytest.raises(UserError, match="is an existing file"):
        cross_validate(table, PreprocessingConfig(), TrainSettings(), tmp_path / "file")


def test_plans_apply_keeps_edited_output_and_warns_on_large_patch(tmp_path, monkeypatch, capsys):
    from tests.test_cli_plans import unet_plans

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    folder = tmp_path / "Dataset998_Test"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(unet_plans()))  # median image 40^3 voxels
    assert main(["plans", "apply", "paper", "-d", "Dataset998_Test"]) == 0
    err = capsys.readouterr().err
    assert "warning: patch [128, 128, 128] is larger than the median image size [40, 40, 40]" in err
    out = folder / "nnUNetPlans_nnMambaPaper.json"
    assert main(["plans", "apply", "paper", "-d", "Dataset998_Test"]) == 0  # same result: fine
    edited = json.loads(out.read_text())
    edited["configurations"]["3d_fullres"]["batch_size"] = 5
    out.write_text(json.dumps(edited))
    assert main(["plans", "apply", "paper", "-d", "Dataset998_Test"]) == 2
    assert "differs from what preset paper gives" in capsys.readouterr().err
    assert json.loads(out.read_text())["configurations"]["3d_fullres"]["batch_size"] == 5
    assert main(["plans", "apply", "paper", "-d", "Dataset998_Test", "--overwrite"]) == 0
    assert json.loads(out.read_text())["configurations"]["3d_fullres"]["batch_size"] == 2
    (folder / "nnUNetPlans.json").write_text('{"plans_name": "a", "plans_name": "b"}')
    assert main(["plans", "apply", "paper", "-d", "Dataset998_Test"]) == 2
    assert "'plans_name' appears twice" in capsys.readouterr().err
