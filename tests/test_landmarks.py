"""Landmark detection: geometry, heatmaps, metrics, bad input, networks, training and the CLI."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_mamba.cli import main as cli_main
from nnunet_mamba.errors import UserError
from nnunet_mamba.landmarks.augment import (AugmentationConfig, LandmarkAugmenter,
                                            no_augmentation, rotation_matrix)
from nnunet_mamba.landmarks.data import load_training_cases
from nnunet_mamba.landmarks.geometry import (WorkingGrid, array_to_index, index_to_array,
                                             index_to_world, world_to_index)
from nnunet_mamba.landmarks.heatmaps import decode_heatmaps, gaussian_heatmaps
from nnunet_mamba.landmarks.inference import predict_heatmaps
from nnunet_mamba.landmarks.io import read_landmarks, write_landmarks
from nnunet_mamba.landmarks.metrics import evaluate_folders
from nnunet_mamba.landmarks.synth import synthesize_dataset
from nnunet_mamba.landmarks.training import make_splits
from nnunet_mamba.networks.blocks import MICCSS
from nnunet_mamba.networks.nnmamba_landmark import ResUNetLandmark, nnMambaLandmark


def oblique_image(size=(20, 30, 10), spacing=(0.7, 1.3, 2.5), origin=(10.0, -20.0, 35.0),
                  angles_deg=(15.0, -25.0, 40.0)) -> sitk.Image:
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection([float(v) for v in rotation_matrix(np.deg2rad(angles_deg)).ravel()])
    return img


# ----------------------------------------------------------------------------- geometry
def test_world_voxel_round_trip_on_oblique_anisotropic_image():
    img = oblique_image()
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    assert not np.allclose(direction, np.eye(3))
    index = np.array([[3.2, 5.7, 1.4], [0.0, 0.0, 0.0], [19.0, 29.0, 9.0]])
    by_hand = np.asarray(img.GetOrigin()) + (index * np.asarray(img.GetSpacing())) @ direction.T
    world = index_to_world(img, index)
    np.testing.assert_allclose(world, by_hand, atol=1e-9)
    np.testing.assert_allclose(world_to_index(img, by_hand), index, atol=1e-9)
    np.testing.assert_allclose(array_to_index(index_to_array(index)), index)
    assert index_to_array(index)[0].tolist() == [1.4, 5.7, 3.2]


def test_working_grid_covers_the_image_and_maps_landmarks_exactly():
    img = oblique_image(size=(40, 30, 12), spacing=(0.8, 1.1, 3.0))
    grid = WorkingGrid.covering(img, (32, 32, 32))
    ref = grid.reference_image()
    # same physical box: the outer voxel corners coincide
    for lo_hi in ([-0.5] * 3, [31.5] * 3):
        src = np.where(np.asarray(lo_hi) < 0, -0.5, np.asarray(img.GetSize()) - 0.5)
        np.testing.assert_allclose(index_to_world(ref, [lo_hi]), index_to_world(img, [src]),
                                   atol=1e-9)
    np.testing.assert_allclose(grid.spacing, (0.8 * 40 / 32, 1.1 * 30 / 32, 3.0 * 12 / 32))
    # grid voxel j sits at source continuous index (j + 0.5) * n / m - 0.5
    j = np.array([[5.0, 17.0, 30.0]])
    src_idx = (j + 0.5) * np.asarray(img.GetSize()) / 32 - 0.5
    np.testing.assert_allclose(index_to_world(ref, j), index_to_world(img, src_idx), atol=1e-9)
    # a blob drawn at a world point shows up at the grid coordinates of that point
    point = index_to_world(img, [[22.3, 13.6, 6.2]])[0]
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in img.GetSize()[::-1]], indexing="ij")
    vox = index_to_world(img, np.stack([xx, yy, zz], -1).reshape(-1, 3)).reshape(*zz.shape, 3)
    arr = np.exp(-((vox - point) ** 2).sum(-1) / (2 * 4.0 ** 2)).astype(np.float32)
    blob = sitk.GetImageFromArray(arr)
    blob.CopyInformation(img)
    coords = grid.world_to_array([point])[0]
    for antialias in (False, True):  # x shrinks (40 -> 32 voxels): smoothed with antialias
        resampled = sitk.GetArrayFromImage(grid.resample(blob, antialias=antialias))
        assert resampled.shape == (32, 32, 32)
        found, _ = decode_heatmaps(torch.from_numpy(resampled)[None], radius=2, sharpen=8.0)
        assert np.linalg.norm(found[0] - coords) < 0.3
    np.testing.assert_allclose(grid.array_to_world([coords])[0], point, atol=1e-9)
    assert WorkingGrid.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid


# ----------------------------------------------------------------------------- heatmaps
@pytest.mark.parametrize("sigma", [2.0, 5.0])
def test_heatmap_decoding_recovers_a_sub_voxel_peak(sigma):
    true = torch.tensor([[10.3, 12.65, 8.8], [3.45, 20.0, 25.71], [30.6, 0.2, 16.5]],
                        dtype=torch.float64)
    heat = gaussian_heatmaps(true, (32, 32, 32), sigma)
    assert heat.shape == (3, 32, 32, 32)
    assert math.isclose(float(gaussian_heatmaps(torch.tensor([[4.0, 5.0, 6.0]]),
                                                (8, 8, 8), sigma)[0, 4, 5, 6]), 1.0)
    found, peaks = decode_heatmaps(heat, radius=3, sigma=sigma)
    # interior landmarks: exact to 0.02 voxel; one in the outermost voxels loses half of its
    # window, which pulls it inwards, but it stays within half a voxel
    np.testing.assert_allclose(found[:2], true[:2].numpy(), atol=0.02)
    assert np.all(np.abs(found[2] - true[2].numpy()) < 0.5)
    assert np.all(peaks > 0.9)
    # a plain (un-sharpened) local centre of mass is pulled to the arg-max voxel
    plain, _ = decode_heatmaps(heat[:1], radius=3, sharpen=1.0)
    assert np.abs(plain[0] - true[0].numpy()).max() > 0.05
    # batched input keeps its leading axes; a non-positive map decodes to its arg-max
    both, _ = decode_heatmaps(torch.stack([heat, -heat]), radius=3, sigma=sigma)
    assert both.shape == (2, 3, 3)
    assert np.all(both[1] == np.round(both[1]))


def test_augmentation_moves_landmarks_with_the_image():
    torch.manual_seed(0)
    coords = torch.tensor([[[8.2, 20.5, 11.3], [22.7, 9.4, 19.9]]], dtype=torch.float64)
    image = gaussian_heatmaps(coords, (32, 32, 32), 1.5).sum(1, keepdim=True).float()
    cfg = AugmentationConfig(rotation_deg=15.0, scale=0.15, translation=0.1, affine_prob=1.0,
                             intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)
    aug = LandmarkAugmenter(cfg, ["a", "b"], seed=3)
    moved_any = False
    for _ in range(4):
        out, new = aug(image.double(), coords)
        moved_any |= bool((new - coords).abs().max() > 0.5)
        for k in range(2):
            window = gaussian_heatmaps(new[0, k:k + 1], (32, 32, 32), 3.0)[0]
            found, _ = decode_heatmaps((out[0, 0] * window)[None], radius=2, sharpen=4.0)
            assert np.linalg.norm(found[0] - new[0, k].numpy()) < 0.35
    assert moved_any
    # declared left/right pairs: a mirror swaps the names; the image is mirrored along x
    flip = AugmentationConfig(affine_prob=0.0, flip_pairs=(("a", "b"),), flip_prob=1.0,
                              intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)
    out, new = LandmarkAugmenter(flip, ["a", "b"], seed=0)(image.double(), coords)
    mirrored = coords[0].clone()
    mirrored[:, 2] = 31 - mirrored[:, 2]
    np.testing.assert_allclose(new[0].numpy(), mirrored.flip(0).numpy(), atol=1e-9)
    torch.testing.assert_close(out, image.double().flip(-1))
    # no pairs: never a flip, and no augmentation leaves everything unchanged
    out, new = LandmarkAugmenter(no_augmentation(), ["a", "b"])(image, coords)
    assert torch.equal(out, image) and torch.equal(new, coords)


# ----------------------------------------------------------------------------- metrics
def _write_csv(path, marks):
    path.write_text("name,x,y,z\n" + "".join(f"{n},{p[0]},{p[1]},{p[2]}\n"
                                             for n, p in marks.items()))


def test_mre_and_success_rates_by_hand(tmp_path):
    ref, pred = tmp_path / "ref" / "landmarks", tmp_path / "pred"
    ref.mkdir(parents=True)
    pred.mkdir()
    base = {"nasion": [10.0, 20.0, 30.0], "sella": [-5.0, 0.0, 12.5]}
    # offsets (mm): case1 nasion 5 (3-4-0), sella 1; case2 nasion 2.5 (1.5-2-0), sella 3
    offsets = {"c1": {"nasion": [3, 4, 0], "sella": [0, 0, 1]},
               "c2": {"nasion": [1.5, -2, 0], "sella": [0, 3, 0]}}
    for case, off in offsets.items():
        _write_csv(ref / f"{case}.csv", base)
        write_landmarks(pred / f"{case}.json",
                        {n: np.add(base[n], off[n]) for n in base}, confidence={"nasion": 1.0})
    # a prediction stated in RAS is converted (x, y negated) before scoring
    ras = {n: np.add(base[n], offsets["c2"][n]) * [-1, -1, 1] for n in base}
    (pred / "c2.json").write_text(json.dumps(
        {"landmarks": {n: list(v) for n, v in ras.items()}, "coordinate_system": "RAS"}))
    summary = evaluate_folders(pred, tmp_path / "ref", tmp_path / "eval")
    nas, sel, ov = (summary["per_landmark"]["nasion"], summary["per_landmark"]["sella"],
                    summary["overall"])
    assert math.isclose(nas["mre_mm"], 3.75) and math.isclose(nas["sd_mm"], 1.25)
    assert math.isclose(sel["mre_mm"], 2.0) and math.isclose(sel["sd_mm"], 1.0)
    assert math.isclose(ov["mre_mm"], (5 + 1 + 2.5 + 3) / 4)
    assert math.isclose(ov["sd_mm"], float(np.std([5, 1, 2.5, 3])))
    assert ov["sdr_percent"] == {"2": 25.0, "2.5": 50.0, "3": 75.0, "4": 75.0}
    assert nas["sdr_percent"]["2.5"] == 50.0 and sel["sdr_percent"]["2"] == 50.0
    assert summary["per_case_mre_mm"] == {"c1": 3.0, "c2": 2.75}
    md = (tmp_path / "eval" / "summary.md").read_text()
    assert "| nasion | 3.75 ± 1.25 |" in md and "| **All** | 2.88 ± 1.43 |" in md
    rows = (tmp_path / "eval" / "per_case.csv").read_text().splitlines()
    assert rows[0] == "case,nasion,sella,mean" and rows[1].startswith("c1,5.0000,1.0000")


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_data")
    synthesize_dataset(root, 4, size=(16, 16, 12), seed=5)
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_input_errors_name_the_case_and_the_fix(small_dataset, tmp_path, capsys):
    # landmark outside the image
    d = _copy(small_dataset, tmp_path / "outside")
    marks = read_landmarks(d / "landmarks" / "case_001.json")
    marks["dark"] = marks["dark"] + 500.0
    write_landmarks(d / "landmarks" / "case_001.json", marks)
    with pytest.raises(UserError, match=r"case 'case_001': landmark 'dark' .* outside the image"
                                        r".*coordinate_system"):
        load_training_cases(d, (16, 16, 16), log=None)
    # a case misses a landmark name
    d = _copy(small_dataset, tmp_path / "missing")
    marks = read_landmarks(d / "landmarks" / "case_002.json")
    del marks["wide"]
    write_landmarks(d / "landmarks" / "case_002.json", marks)
    with pytest.raises(UserError, match=r"case_002.*missing 'wide'.*same landmarks"):
        load_training_cases(d, (16, 16, 16), log=None)
    # mismatched landmark sets (a renamed landmark: one missing, one extra)
    d = _copy(small_dataset, tmp_path / "renamed")
    marks = read_landmarks(d / "landmarks" / "case_003.json")
    marks["Bright"] = marks.pop("bright")
    write_landmarks(d / "landmarks" / "case_003.json", marks)
    with pytest.raises(UserError, match=r"case 'case_003'.*missing 'bright'; extra 'Bright'"):
        load_training_cases(d, (16, 16, 16), log=None)
    # an image without a landmark file, through the CLI: message and exit status 2
    d = _copy(small_dataset, tmp_path / "nofile")
    (d / "landmarks" / "case_000.json").unlink()
    rc = cli_main(["landmarks", "train", "--data", str(d), "--out", str(tmp_path / "m"),
                   "--size", "16", "16", "16", "--epochs", "1", "--folds", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "case 'case_000'" in err and "has no landmark file" in err
    assert "case_000.json" in err
    # malformed files
    bad = tmp_path / "bad.csv"
    bad.write_text("name,x,y,z\n,1,2,3\n")
    with pytest.raises(UserError, match="row 1: the landmark name is empty"):
        read_landmarks(bad)
    bad.write_text("a,1,2\n")
    with pytest.raises(UserError, match="expected 4 columns"):
        read_landmarks(bad)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": {"a": [1, 2, 3]}}))
    with pytest.raises(UserError, match='no "landmarks" object'):
        read_landmarks(bad)
    bad.write_text(json.dumps({"landmarks": {"a": [1, "x", 3]}}))
    with pytest.raises(UserError, match="landmark 'a': expected three finite numbers"):
        read_landmarks(bad)
    # evaluation: a reference case without a prediction
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(small_dataset / "landmarks" / "case_000.json", pred)
    with pytest.raises(UserError, match=r"no prediction for reference case\(s\) case_001"):
        evaluate_folders(pred, small_dataset)
    # too few cases for the folds
    with pytest.raises(UserError, match="cannot be split into 5 folds"):
        make_splits(["a", "b", "c"], 5, 0)


def test_splits_partition_the_cases():
    ids = [f"c{i:02d}" for i in range(23)]
    splits = make_splits(ids, 5, seed=1)
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == ids and len(set(vals)) == 23
    assert all(set(s["train"]) | set(s["val"]) == set(ids) for s in splits)
    assert all(not set(s["train"]) & set(s["val"]) for s in splits)
    assert splits == make_splits(list(reversed(ids)), 5, seed=1)


# ----------------------------------------------------------------------------- networks
def test_nnmamba_landmark_has_one_mamba_layer_at_the_first_block():
    net = nnMambaLandmark(1, 6, base_channels=8, blocks_per_stage=2)
    layers = [m for m in net.modules() if isinstance(m, MICCSS)]
    assert len(layers) == 1 and layers[0] is net.encoder.stem_mamba
    assert all(block.branch is None for stage in net.encoder.stages for block in stage)
    base = ResUNetLandmark(1, 6, base_channels=8, blocks_per_stage=2)
    assert not any(isinstance(m, MICCSS) for m in base.modules())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(net) - n(base) == n(layers[0])
    assert not net.decoder.deep_supervision
    x = torch.randn(1, 1, 20, 24, 18)
    out = net(x)
    assert out.shape == (1, 6, 20, 24, 18) and base(x).shape == out.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_fold_ensemble_averages_the_heatmaps():
    torch.manual_seed(0)
    nets = [ResUNetLandmark(1, 2, base_channels=4, blocks_per_stage=1).eval() for _ in range(2)]
    for net in nets:
        torch.nn.init.normal_(net.decoder.seg_head.weight)  # the head starts at zero
    image = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    mean = predict_heatmaps(nets, image, torch.device("cpu"))
    with torch.no_grad():
        each = [net(torch.from_numpy(image)[None, None])[0] for net in nets]
    torch.testing.assert_close(mean, (each[0] + each[1]) / 2)
    assert not torch.allclose(each[0], each[1])


# ----------------------------------------------------------------------------- training
def test_cross_validation_writes_splits_logs_and_the_pooled_evaluation(small_dataset, tmp_path,
                                                                        capsys):
    out = tmp_path / "cv"
    args = ["landmarks", "train", "--data", str(small_dataset), "--out", str(out), "--size",
            "16", "16", "16", "--sigma", "2", "--epochs", "2", "--iterations-per-epoch", "1",
            "--folds", "2", "--model", "resunet", "--base-channels", "4",
            "--blocks-per-stage", "1", "--device", "cpu"]
    assert cli_main(args + ["--flip-pairs", "bright:nose"]) == 2
    assert "--flip-pairs names unknown landmark(s) nose" in capsys.readouterr().err
    assert cli_main(args + ["--flip-pairs", "bright:dark"]) == 0
    stdout = capsys.readouterr().out
    assert "fold 1 epoch   2/2  train loss" in stdout and "2-fold cross-validation" in stdout
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(splits[0]["val"] + splits[1]["val"]) == [f"case_{i:03d}" for i in range(4)]
    summary = json.loads((out / "cv_evaluation" / "summary.json").read_text())
    assert sorted(summary["cases"]) == [f"case_{i:03d}" for i in range(4)]
    assert (out / "cv_evaluation" / "summary.md").read_text().startswith("| Landmark |")
    config = json.loads((out / "config.json").read_text())
    assert config["augmentation"]["flip_pairs"] == [["bright", "dark"]]
    assert (out / "fold_1" / "progress.png").read_bytes()[:4] == b"\x89PNG"
    # a second run does not silently overwrite trained folds
    assert cli_main(args) == 2
    assert "already holds a trained model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small nnMamba trained on fold 0 of a synthetic set through the CLI."""
    root = tmp_path_factory.mktemp("lm_train")
    data, model = root / "data", root / "model"
    assert cli_main(["landmarks", "synth", str(data), "--cases", "20", "--seed", "1"]) == 0
    rc = cli_main(["landmarks", "train", "--data", str(data), "--out", str(model),
                   "--size", "32", "32", "32", "--sigma", "3", "--epochs", "7",
                   "--folds", "4", "--fold", "0", "--base-channels", "8",
                   "--blocks-per-stage", "1", "--lr", "2e-3", "--val-every", "4",
                   "--device", "cpu", "--quiet"])
    assert rc == 0
    return data, model


def test_training_reaches_an_mre_under_two_voxels(trained):
    data, model = trained
    fold = model / "fold_0"
    for name in ("checkpoint_final.pt", "checkpoint_best.pt", "log.txt", "progress.png",
                 "progress.json"):
        assert (fold / name).is_file(), name
    history = json.loads((fold / "progress.json").read_text())
    assert len(history) == 7 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert "epoch   7/7" in (fold / "log.txt").read_text()
    config = json.loads((model / "config.json").read_text())
    assert config["landmarks"] == ["bright", "dark", "wide"] and config["model"] == "nnmamba"
    assert config["optimizer"] == {"name": "Adam", "lr": 2e-3, "weight_decay": 0.0,
                                   "schedule": "constant"}
    grids = json.loads((model / "working_grids.json").read_text())
    assert len(grids) == 20 and grids["case_000"]["size"] == [32, 32, 32]
    # the working grid spans the 32 mm synthetic cube: 1 voxel = 1 mm
    summary = json.loads((fold / "validation_metrics" / "summary.json").read_text())
    assert len(summary["cases"]) == 5
    assert summary["overall"]["mre_mm"] < 2.0, summary["overall"]


def test_predict_then_evaluate_through_the_cli(trained, tmp_path, capsys):
    data, model = trained
    val = json.loads((model / "splits.json").read_text())[0]["val"]
    images = tmp_path / "images"
    images.mkdir()
    for case in val:
        shutil.copy(data / "images" / f"{case}.nii.gz", images)
    pred = tmp_path / "pred"
    assert cli_main(["landmarks", "predict", "--model", str(model), "--images", str(images),
                     "--out", str(pred), "--device", "cpu", "--quiet"]) == 0
    doc = json.loads((pred / f"{val[0]}.json").read_text())
    assert set(doc["landmarks"]) == {"bright", "dark", "wide"}
    assert doc["coordinate_system"] == "LPS" and doc["folds"] == [0]
    assert all(c > 0.3 for c in doc["confidence"].values())
    # the voxel index written is the world point seen through the image geometry
    img = sitk.ReadImage(str(images / f"{val[0]}.nii.gz"))
    np.testing.assert_allclose(index_to_world(img, [doc["voxel_index"]["dark"]])[0],
                               doc["landmarks"]["dark"], atol=1e-6)
    capsys.readouterr()
    assert cli_main(["landmarks", "evaluate", "--pred", str(pred), "--ref", str(data),
                     "--out", str(tmp_path / "eval")]) == 2  # the other 15 cases lack predictions
    assert "no prediction for reference case(s)" in capsys.readouterr().err
    ref = tmp_path / "ref"
    ref.mkdir()
    for case in val:
        shutil.copy(data / "landmarks" / f"{case}.json", ref)
    assert cli_main(["landmarks", "evaluate", "--pred", str(pred), "--ref", str(ref),
                     "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "| **All** |" in out and "SDR 2.5 mm (%)" in out
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    fold_summary = json.loads(
        (model / "fold_0" / "validation_metrics" / "summary.json").read_text())
    # predicting the validation cases with the fold-0 model reproduces its validation MRE
    assert math.isclose(summary["overall"]["mre_mm"], fold_summary["overall"]["mre_mm"],
                        rel_tol=1e-4)
    assert summary["overall"]["mre_mm"] < 2.0
