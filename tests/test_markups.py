"""3D Slicer markups (.fcsv, .mrk.json): reading, writing, RAS/LPS, and the image's world frame.

The reference for "where is this voxel in RAS" is nibabel's affine of the NIfTI file (RAS by
definition), independent of SimpleITK's LPS geometry and of the reader under test.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mamba.cli import main as cli_main
from nnunet_mamba.errors import UserError
from nnunet_mamba.landmarks.augment import rotation_matrix
from nnunet_mamba.landmarks.io import list_landmark_files, read_landmarks, write_landmarks
from nnunet_mamba.landmarks.markups import MRK_SCHEMA, read_fcsv

INDICES = np.array([[3.0, 5.0, 2.0], [17.25, 1.5, 8.0], [0.0, 28.0, 9.5]])  # (x, y, z) voxels
NAMES = ["nasion", "left ear, tragus", "sella"]  # a comma in a label must survive CSV


@pytest.fixture(scope="module")
def oblique_nifti(tmp_path_factory):
    """An oblique, anisotropic NIfTI file and the RAS world points of INDICES (nibabel)."""
    img = sitk.Image([20, 30, 10], sitk.sitkFloat32)
    img.SetSpacing((0.7, 1.3, 2.5))
    img.SetOrigin((10.0, -20.0, 35.0))
    img.SetDirection([float(v) for v in rotation_matrix(np.deg2rad([15.0, -25.0, 40.0])).ravel()])
    path = tmp_path_factory.mktemp("oblique") / "case.nii.gz"
    sitk.WriteImage(img, str(path))
    affine = nib.load(str(path)).affine  # voxel (i, j, k) -> RAS mm
    ras = (affine @ np.c_[INDICES, np.ones(len(INDICES))].T).T[:, :3]
    return sitk.ReadImage(str(path)), ras


def _indices(image, points_lps) -> np.ndarray:
    return np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p)))
                     for p in points_lps])


def _fcsv(rows, system_line):
    head = "# Markups fiducial file version = 4.11\n" + system_line + \
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
    body = "".join(f'{k},{float(x)!r},{float(y)!r},{float(z)!r},0,0,0,1,1,1,0,"{n}",,\n'
                   for k, (n, (x, y, z)) in enumerate(rows, 1))
    return head + body


@pytest.mark.parametrize("system_line,flip", [
    ("# CoordinateSystem = RAS\n", False), ("# CoordinateSystem = 0\n", False), ("", False),
    ("# CoordinateSystem = LPS\n", True), ("# CoordinateSystem = 1\n", True)])
def test_fcsv_as_slicer_writes_it_lands_on_the_right_voxels(oblique_nifti, tmp_path, system_line,
                                                              flip):
    image, ras = oblique_nifti
    coords = ras * [-1, -1, 1] if flip else ras  # what Slicer writes in an LPS file
    path = tmp_path / "case.fcsv"
    path.write_text(_fcsv(zip(NAMES, coords), system_line))
    marks = read_landmarks(path)
    assert list(marks) == NAMES
    np.testing.assert_allclose(_indices(image, list(marks.values())), INDICES, atol=1e-6)


@pytest.mark.parametrize("system", ["RAS", "LPS", None])
def test_mrk_json_as_slicer_writes_it_lands_on_the_right_voxels(oblique_nifti, tmp_path, system):
    image, ras = oblique_nifti
    coords = ras if system == "RAS" else ras * [-1, -1, 1]  # absent: LPS, Slicer's default
    markup = {"type": "Fiducial", "controlPoints": [
        {"label": n, "position": list(map(float, p)), "positionStatus": "defined"}
        for n, p in zip(NAMES, coords)]}
    if system:
        markup["coordinateSystem"] = system
    path = tmp_path / "case.mrk.json"
    path.write_text(json.dumps({"@schema": MRK_SCHEMA, "markups": [markup]}))
    marks = read_landmarks(path)
    assert list(marks) == NAMES
    np.testing.assert_allclose(_indices(image, list(marks.values())), INDICES, atol=1e-6)


@pytest.mark.parametrize("suffix", [".fcsv", ".mrk.json"])
@pytest.mark.parametrize("system", ["RAS", "LPS"])
def test_write_then_read_round_trips_on_an_oblique_image(oblique_nifti, tmp_path, suffix, system):
    image, ras = oblique_nifti
    lps = {n: p * [-1, -1, 1] for n, p in zip(NAMES, ras)}
    np.testing.assert_allclose(_indices(image, list(lps.values())), INDICES, atol=1e-6)
    path = tmp_path / f"case{suffix}"
    write_landmarks(path, lps, coordinate_system=system,
                    confidence={n: 0.5 for n in NAMES}, voxel_index={"ignored": [1, 2, 3]})
    text = path.read_text()
    # the file states its frame, and holds the points in that frame
    written = ras if system == "RAS" else ras * [-1, -1, 1]
    if suffix == ".fcsv":
        assert f"# CoordinateSystem = {system}\n" in text
        assert "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID" in text
        first = text.splitlines()[3].split(",")
        np.testing.assert_allclose([float(v) for v in first[1:4]], written[0], atol=1e-9)
        assert "confidence 0.500" in text
    else:
        doc = json.loads(text)
        assert doc["@schema"] == MRK_SCHEMA
        (markup,) = doc["markups"]
        assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == system
        assert [cp["label"] for cp in markup["controlPoints"]] == NAMES
        np.testing.assert_allclose([cp["position"] for cp in markup["controlPoints"]], written,
                                   atol=1e-9)
        assert "ignored" not in text
    back = read_landmarks(path)
    assert list(back) == NAMES
    np.testing.assert_allclose(np.array(list(back.values())), np.array(list(lps.values())),
                               atol=1e-9)
    np.testing.assert_allclose(_indices(image, list(back.values())), INDICES, atol=1e-6)


def test_case_ids_of_markups_files_and_plain_json_with_markups(tmp_path):
    lps = {"a": [1.0, 2.0, 3.0]}
    write_landmarks(tmp_path / "c1.mrk.json", lps)
    write_landmarks(tmp_path / "c2.fcsv", lps)
    write_landmarks(tmp_path / "c3.json", lps)
    assert list(list_landmark_files(tmp_path)) == ["c1", "c2", "c3"]
    # a Slicer markups file saved as plain .json is recognised by its content
    (tmp_path / "c4.json").write_text((tmp_path / "c1.mrk.json").read_text())
    np.testing.assert_allclose(read_landmarks(tmp_path / "c4.json")["a"], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("name,text,needle", [
    ("ijk.fcsv", "# CoordinateSystem = IJK\n1,1,2,3,0,0,0,1,1,1,0,a,,\n", "IJK"),
    ("nolabel.fcsv", "# CoordinateSystem = LPS\n1,1,2,3,0,0,0,1,1,1,0,,,\n", "no label"),
    ("twice.fcsv", "1,1,2,3,0,0,0,1,1,1,0,a,,\n2,1,2,3,0,0,0,1,1,1,0,a,,\n", "twice"),
    ("short.fcsv", "1,1,2,3\n", "columns"),
    ("nan.fcsv", "1,1,nan,3,0,0,0,1,1,1,0,a,,\n", "finite"),
    ("unplaced.mrk.json", json.dumps({"markups": [{"type": "Fiducial", "controlPoints": [
        {"label": "a", "positionStatus": "undefined"}]}]}), "not placed"),
    ("line.mrk.json", json.dumps({"markups": [{"type": "Line", "controlPoints": []}]}), "Line"),
    ("units.mrk.json", json.dumps({"markups": [{"type": "Fiducial", "coordinateUnits": "um",
                                                "controlPoints": []}]}), "mm"),
])
def test_bad_markups_name_the_file_and_the_problem(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_landmarks(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_fcsv_columns_header_sets_the_order(tmp_path):
    path = tmp_path / "reordered.fcsv"
    path.write_text("# CoordinateSystem = LPS\n# columns = label,id,z,y,x\n\"b, c\",7,3,2,1\n")
    np.testing.assert_allclose(read_fcsv(path)["b, c"], [1.0, 2.0, 3.0])


@pytest.mark.slow
def test_predict_format_slicer_writes_markups_that_read_back_as_the_json(tmp_path, capsys):
    data, model = tmp_path / "data", tmp_path / "model"
    assert cli_main(["landmarks", "synth", str(data), "--cases", "3", "--size", "16", "16", "12"]) == 0
    assert cli_main(["landmarks", "train", "--data", str(data), "--out", str(model), "--folds", "1",
                     "--epochs", "1", "--size", "16", "16", "16", "--base-channels", "4",
                     "--blocks-per-stage", "1", "--model", "resunet", "--device", "cpu",
                     "--quiet"]) == 0
    outs = {}
    for fmt, suffix in (("json", ".json"), ("slicer", ".mrk.json"), ("fcsv", ".fcsv")):
        out = tmp_path / f"pred_{fmt}"
        assert cli_main(["landmarks", "predict", "--model", str(model), "--images", str(data),
                         "--out", str(out), "--format", fmt, "--device", "cpu", "--quiet"]) == 0
        files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        assert files == [f"case_{i:03d}{suffix}" for i in range(3)], files
        outs[fmt] = {f: read_landmarks(out / f) for f in files}
    for fmt in ("slicer", "fcsv"):
        for (f_json, ref), (f_other, got) in zip(outs["json"].items(), outs[fmt].items()):
            assert list(got) == list(ref)
            np.testing.assert_allclose(np.array(list(got.values())), np.array(list(ref.values())),
                                       atol=1e-9)
    doc = json.loads((tmp_path / "pred_slicer" / "case_000.mrk.json").read_text())
    assert doc["markups"][0]["type"] == "Fiducial"
    assert all(cp["description"].startswith("confidence ") for cp in doc["markups"][0]["controlPoints"])
    # predictions in Slicer's format are scored like JSON ones
    assert cli_main(["landmarks", "evaluate", "--pred", str(tmp_path / "pred_slicer"),
                     "--ref", str(data)]) == 0
