"""nnMamba classification: networks, metrics against scikit-learn, subject-level splits,
bad-input errors, preprocessing, and cross-validated training + prediction on a small
synthetic task (a sphere that is smaller in class AD than in class NC)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_mamba.classification import (binary_metrics, make_folds, multiclass_metrics,
                                         read_table, roc_auc, roc_curve, youden_threshold)
from nnunet_mamba.classification.preprocessing import (PreprocessingConfig, check_images,
                                                       preprocess_case)
from nnunet_mamba.cli import main
from nnunet_mamba.errors import UserError
from nnunet_mamba.networks.nnmamba_cls import ChannelSequenceTokens, ResNet3D, nnMambaCls
from nnunet_mamba.ssm import Mamba

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is faster than two and immune to a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------------
def write_sphere_dataset(root: Path, n_subjects: int = 40, size_mm: float = 24.0, seed: int = 0,
                         second_scan_every: int = 5, coarse_every: int = 7,
                         labelled: bool = True) -> Path:
    """Noisy volumes with a bright sphere, radius 8-9 mm for NC and 5-6 mm for AD.

    Every ``second_scan_every``-th subject has two scans (two rows); every
    ``coarse_every``-th is stored at 1.5 mm instead of 1 mm (so resampling matters).
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_subjects):
        label = i % 2
        for k in range(2 if i % second_scan_every == 0 else 1):
            spacing = 1.5 if i % coarse_every == 3 else 1.0
            n = int(round(size_mm / spacing))
            radius = rng.uniform(5.0, 6.0) if label else rng.uniform(8.0, 9.0)
            centre = size_mm / 2 + rng.uniform(-2, 2, 3)
            grid = (np.indices((n, n, n)) + 0.5) * spacing
            dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
            img = (dist < radius) * rng.uniform(0.8, 1.2) + rng.normal(0, 0.3, (n, n, n))
            image = sitk.GetImageFromArray(img.astype(np.float32))
            image.SetSpacing((spacing,) * 3)
            name = f"s{seed}_{i:03d}_{k}.nii.gz"
            sitk.WriteImage(image, str(root / name))
            rows.append([f"sub{seed}_{i:03d}", name] + ([["NC", "AD"][label]] if labelled else []))
    path = root / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "image"] + (["label"] if labelled else []))
        w.writerows(rows)
    return path


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_image(path: Path, shape=(8, 8, 8)) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(*shape).astype(np.float32)), str(path))
    return path


# ---------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------
def test_nnmamba_cls_shapes_and_mamba_placement():
    torch.manual_seed(0)
    net = nnMambaCls(2, 3, base_channels=8, blocks_per_stage=2)
    assert net.tokens.tokens_per_scale == (1, 2, 4) and net.tokens.num_tokens == 7
    mambas = [m for m in net.modules() if isinstance(m, Mamba)]
    assert len(mambas) == 2  # one after the stem, one over the 7 channel tokens
    assert net.encoder.stem_mamba is not None
    assert all(b.branch is None for stage in net.encoder.stages for b in stage)
    assert net.head.mlp[0].in_features == 7 * 16 and net.head.mlp[0].out_features == 8
    x = torch.randn(2, 2, 16, 20, 24)
    out = net(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_default_sizes_are_the_papers_and_the_baseline_is_similar():
    cls, base = nnMambaCls(1, 2), ResNet3D(1, 2)
    assert cls.head.mlp[0].in_features == 448 and cls.head.mlp[0].out_features == 32
    assert not any(isinstance(m, Mamba) for m in base.modules())
    n_cls = sum(p.numel() for p in cls.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    assert abs(n_cls - n_base) / n_base < 0.05, (n_cls, n_base)


def test_channel_tokens_are_consecutive_channel_blocks_of_pooled_features():
    feats = [torch.arange(c, dtype=torch.float32).reshape(1, c, 1, 1, 1).expand(1, c, 2, 2, 2)
             for c in (4, 8, 16)]
    tokens = ChannelSequenceTokens((4, 8, 16), token_width=4)(feats)
    assert tokens.shape == (1, 7, 4)
    assert tokens[0, 2].tolist() == [4, 5, 6, 7]  # scale 2, second token
    assert tokens[0, 6].tolist() == [12, 13, 14, 15]
    with pytest.raises(ValueError):
        ChannelSequenceTokens((4, 6), token_width=4)


# ---------------------------------------------------------------------------------------
# metrics against scikit-learn
# ---------------------------------------------------------------------------------------
def _fixed_predictions(n=60, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.25, n), 0, 1), 2)  # with ties
    return y, score


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.61, 0.95])
def test_binary_metrics_match_sklearn(threshold):
    m = sklearn_metrics
    y, score = _fixed_predictions()
    pred = (score >= threshold).astype(int)
    ours = binary_metrics(y, score, threshold)
    assert ours["AUC"] == pytest.approx(m.roc_auc_score(y, score))
    assert ours["ACC"] == pytest.approx(m.accuracy_score(y, pred))
    assert ours["SEN"] == pytest.approx(m.recall_score(y, pred, zero_division=0))
    assert ours["SPE"] == pytest.approx(m.recall_score(1 - y, 1 - pred, zero_division=0))
    assert ours["PRE"] == pytest.approx(m.precision_score(y, pred, zero_division=0))
    assert ours["F1"] == pytest.approx(m.f1_score(y, pred, zero_division=0))


def test_roc_curve_and_auc_match_sklearn_and_youden_is_optimal():
    y, score = _fixed_predictions(n=80, seed=3)
    fpr, tpr, thr = roc_curve(y, score)
    sk_fpr, sk_tpr, sk_thr = sklearn_metrics.roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert roc_auc(y, score) == pytest.approx(sklearn_metrics.auc(sk_fpr, sk_tpr))
    t = youden_threshold(y, score)
    at_t = binary_metrics(y, score, t)
    assert at_t["SEN"] + at_t["SPE"] - 1 == pytest.approx(np.max(sk_tpr - sk_fpr))
    assert not np.any(np.isclose(score, t))  # between two validation scores


def test_precision_is_zero_when_nothing_is_predicted_positive_like_sklearn():
    y = np.array([0, 1, 0, 1])
    score = np.array([0.1, 0.2, 0.3, 0.4])
    ours = binary_metrics(y, score, threshold=0.9)
    assert ours["PRE"] == 0.0 and ours["SEN"] == 0.0 and ours["F1"] == 0.0 and ours["SPE"] == 1
    assert ours["AUC"] == pytest.approx(0.75)


def test_multiclass_metrics_match_sklearn_macro_averages():
    m = sklearn_metrics
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1, 2], 15)
    prob = rng.dirichlet(np.ones(3), size=len(y)) + np.eye(3)[y] * 0.4
    prob /= prob.sum(1, keepdims=True)
    pred = prob.argmax(1)
    ours = multiclass_metrics(y, prob)
    assert ours["AUC"] == pytest.approx(m.roc_auc_score(y, prob, multi_class="ovr"))
    assert ours["ACC"] == pytest.approx(m.accuracy_score(y, pred))
    assert ours["SEN"] == pytest.approx(m.recall_score(y, pred, average="macro"))
    assert ours["PRE"] == pytest.approx(m.precision_score(y, pred, average="macro",
                                                          zero_division=0))
    assert ours["F1"] == pytest.approx(m.f1_score(y, pred, average="macro", zero_division=0))
    spe = np.mean([m.recall_score(y != k, pred != k) for k in range(3)])
    assert ours["SPE"] == pytest.approx(spe)


# ---------------------------------------------------------------------------------------
# subject-level stratified splits
# ---------------------------------------------------------------------------------------
def test_folds_keep_subjects_together_and_are_stratified():
    rng = np.random.default_rng(0)
    labels = {f"s{i}": int(i < 12) for i in range(32)}  # 12 positive, 20 negative subjects
    row_subjects = [s for s in labels for _ in range(rng.integers(1, 4))]  # 1-3 rows each
    folds = make_folds(row_subjects, labels, n_folds=5, val_fraction=0.2, seed=3)
    assert len(folds) == 5
    test_rows = sorted(i for f in folds for i in f.test)
    assert test_rows == list(range(len(row_subjects)))  # every row tested exactly once
    subj = lambda rows: {row_subjects[i] for i in rows}  # noqa: E731
    for f in folds:
        train, val, test = subj(f.train), subj(f.val), subj(f.test)
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(labels)
        for part in (train, val, test):  # no row of a subject outside its part
            rows = [i for i, s in enumerate(row_subjects) if s in part]
            assert set(rows) <= set(f.train) | set(f.val) | set(f.test)
        for part in (f.val, f.test):
            assert {labels[row_subjects[i]] for i in part} == {0, 1}
        assert sum(labels[s] for s in test) in (2, 3)  # 12 positives over 5 folds
    for f in folds:  # rows follow their subject into exactly one part
        for part in (f.train, f.val, f.test):
            for i in part:
                same = [j for j, s in enumerate(row_subjects) if s == row_subjects[i]]
                assert set(same) <= set(part)


def test_too_few_subjects_per_class_is_a_user_error():
    labels = {f"s{i}": int(i < 4) for i in range(20)}  # 4 positives
    with pytest.raises(UserError, match=r"class 'AD' has 4 subject.*at least 7"):
        make_folds(list(labels), labels, n_folds=5, val_fraction=0.2, class_names=["NC", "AD"])


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def test_table_errors_name_the_line_and_the_fix(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.nii.gz")
    hdr = ["subject", "image", "label"]
    cases = [
        ([["s1", "a.nii.gz", "NC"], ["s2", "b.nii.gz", "MCI"]], ["NC", "AD"],
         r"line 3 \(subject s2\): label 'MCI' is not one of the declared classes"),
        ([["s1", "a.nii.gz", "NC"], ["s2", "b.nii.gz", ""]], None,
         r"line 3 \(subject s2\): label missing"),
        ([["s1", "a.nii.gz", "NC"], ["s1", "b.nii.gz", "AD"]], None,
         r"subject 's1' has label 'NC' on line 2 but 'AD' on line 3"),
        ([["s1", "a.nii.gz", "NC"], ["s2", "missing.nii.gz", "AD"]], None,
         r"line 3 \(subject s2\): image file .*missing.nii.gz not found"),
        ([["s1", "a.nii.gz", "AD"], ["s2", "b.nii.gz", "ad "]], None,
         r"differ only by case or spaces"),
        ([["s1", "a.nii.gz", "NC"], ["s2", "b.nii.gz", "NC"]], None, r"only one class"),
        ([["s1", "a.nii.gz", "NC"], ["s2", "a.nii.gz", "NC"], ["s3", "b.nii.gz", "AD"]], None,
         r"belongs to subject 's1' on line 2 and to subject 's2' on line 3"),
        ([["s1", "a.nii.gz", "NC"], ["s1", "a.nii.gz", "NC"], ["s3", "b.nii.gz", "AD"]], None,
         r"line 3 repeats image .*a.nii.gz of line 2"),
        ([["s1", "a.nii.gz", "NC"], ["s1", "b.nii.gz", "NC"], ["s3", "c.nii.gz", "AD"]], None,
         None),  # several images of one subject are fine
    ]
    for rows, classes, pattern in cases:
        path = write_csv(tmp_path / "t.csv", hdr, rows)
        if pattern is None:
            assert len(read_table(path, classes=classes).rows) == len(rows)
            continue
        with pytest.raises(UserError, match=pattern) as err:
            read_table(path, classes=classes)
        assert str(path) in str(err.value) or "subject 's1'" in str(err.value)
    path = write_csv(tmp_path / "t.csv", ["id", "img", "label"], [["s1", "a.nii.gz", "NC"]])
    with pytest.raises(UserError, match=r"no subject-id column 'subject'.*--id-column"):
        read_table(path)
    with pytest.raises(UserError, match=r"no image column"):
        read_table(path, id_column="id")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_stops_the_cli_before_training(tmp_path, capsys, damage):
    data = write_sphere_dataset(tmp_path / "data", n_subjects=14, size_mm=16)
    bad = tmp_path / "data" / "s0_003_0.nii.gz"
    if damage == "garbage":
        bad.write_bytes(b"this is not a NIfTI file")
    else:  # a valid header, half of the voxel data: ITK alone would read zeros silently
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "run"
    code = main(["cls", "train", "--csv", str(data), "--out", str(out), "--device", "cpu",
                 "--epochs", "1", "--size", "16", "16", "16", "--folds", "2",
                 "--val-fraction", "0.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "line 6 (subject sub0_003)" in err and "s0_003_0.nii.gz" in err
    assert ("cannot read this image" if damage == "garbage" else "truncated") in err
    assert not (out / "plans.json").exists() and not (out / "fold_0").exists()


def test_class_too_small_for_the_folds_stops_the_cli(tmp_path, capsys):
    data = write_sphere_dataset(tmp_path / "data", n_subjects=10, size_mm=16)
    code = main(["cls", "train", "--csv", str(data), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--size", "16", "16", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "class 'AD' has 5 subject(s)" in err and "lower --folds" in err


# ---------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------
def test_preprocessing_reorients_resamples_normalises_and_fixes_the_size(tmp_path):
    arr = np.zeros((10, 12, 14), np.float32)  # (z, y, x)
    arr[2, 3, 4] = 5.0
    arr += np.random.default_rng(0).normal(0, 0.1, arr.shape).astype(np.float32)
    ras = sitk.GetImageFromArray(arr)
    ras.SetSpacing((2.0, 2.0, 2.0))
    flipped = sitk.Flip(ras, [True, False, True])  # same physical image, other direction
    sitk.WriteImage(ras, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(flipped, str(tmp_path / "b.nii.gz"))
    cfg = PreprocessingConfig(orientation="RAS", target_spacing=(1.0, 1.0, 1.0),
                              size=(16, 20, 24))
    a = preprocess_case([tmp_path / "a.nii.gz"], cfg)
    b = preprocess_case([tmp_path / "b.nii.gz"], cfg)
    assert a.shape == (1, 24, 20, 16) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)  # orientation normalised
    table = read_table(write_csv(tmp_path / "t.csv", ["subject", "image", "label"],
                                 [["s1", "a.nii.gz", "NC"], ["s2", "b.nii.gz", "AD"]]))
    assert check_images(table, "RAS") == [(2.0, 2.0, 2.0)] * 2
    cfg_native = PreprocessingConfig(target_spacing=None, size=(16, 16, 16))
    c = preprocess_case([tmp_path / "a.nii.gz"], cfg_native)
    inner = c[0, 3:13, 2:14, 1:15]  # centred zero padding of the 10 x 12 x 14 image
    assert abs(inner.mean()) < 1e-4 and inner.std() == pytest.approx(1, abs=1e-3)


def test_channels_on_different_grids_are_refused(tmp_path):
    write_image(tmp_path / "t1.nii.gz", (8, 8, 8))
    write_image(tmp_path / "t2.nii.gz", (8, 8, 9))
    write_image(tmp_path / "u1.nii.gz", (8, 8, 8))
    write_image(tmp_path / "u2.nii.gz", (8, 8, 8))
    path = write_csv(tmp_path / "t.csv", ["subject", "image_0000", "image_0001", "label"],
                     [["s1", "t1.nii.gz", "t2.nii.gz", "NC"],
                      ["s2", "u1.nii.gz", "u2.nii.gz", "AD"]])
    table = read_table(path)
    assert table.image_columns == ("image_0000", "image_0001")
    with pytest.raises(UserError, match=r"line 2 \(subject s1\): channel images differ in grid"):
        check_images(table, "RAS")


# ---------------------------------------------------------------------------------------
# training and prediction
# ---------------------------------------------------------------------------------------
TRAIN_ARGS = ["--size", "16", "16", "16", "--target-spacing", "1.5", "1.5", "1.5",
              "--base-channels", "8", "--batch-size", "4",
              "--epochs", "10", "--lr-schedule", "cosine", "--classes", "NC", "AD",
              "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    data = write_sphere_dataset(root / "data", n_subjects=40, size_mm=24, seed=0)
    out = root / "run"
    t0 = time.time()
    code = main(["cls", "train", "--csv", str(data), "--out", str(out)] + TRAIN_ARGS)
    elapsed = time.time() - t0
    print(f"\n5-fold CV training on 40 synthetic subjects (48 images) took {elapsed:.1f} s")
    assert code == 0
    return root, data, out


def test_cross_validation_learns_the_synthetic_task(trained):
    _, data, out = trained
    results = json.loads((out / "results.json").read_text())
    print("mean test-fold AUC", results["mean"]["AUC"], "per fold",
          [round(f["AUC"], 3) for f in results["per_fold"]])
    assert results["mean"]["AUC"] > 0.9, results
    assert len(results["per_fold"]) == 5 and results["positive_class"] == "AD"
    for name in ("AUC", "ACC", "SEN", "SPE", "PRE", "F1"):
        assert 0 <= results["mean"][name] <= 1 and name in results["std"]
    table = (out / "results.md").read_text()
    assert "mean ± std" in table and table.count("\n| ") >= 7
    for f in ["roc.png", "train.log", "plans.json", "splits.json", "oof_predictions.csv"] + \
             [f"fold_{k}/{n}" for k in range(5) for n in ("checkpoint_best.pth", "curves.png",
                                                          "history.json")]:
        assert (out / f).is_file(), f
    # no subject in two test folds or in two parts of a fold; every subject tested once
    splits = json.loads((out / "splits.json").read_text())
    tested = [s for f in splits for s in f["test"]]
    assert len(tested) == len(set(tested)) == 40
    for f in splits:
        assert not set(f["train"]) & set(f["test"]) and not set(f["val"]) & set(f["test"])
        assert not set(f["train"]) & set(f["val"])
    with open(out / "oof_predictions.csv") as fh:
        oof = list(csv.DictReader(fh))
    assert sorted(r["subject"] for r in oof) == sorted(tested)
    # thresholds come from validation data: the stored ones are those of the checkpoints
    plans = json.loads((out / "plans.json").read_text())
    for entry, fold in zip(plans["folds"], results["per_fold"]):
        ckpt = torch.load(out / entry["checkpoint"], map_location="cpu", weights_only=True)
        assert ckpt["threshold"] == entry["threshold"] == fold["threshold"]
        assert ckpt["epoch"] == fold["best_epoch"]


def test_predict_round_trip_on_new_subjects(trained, tmp_path):
    root, _, out = trained
    new = write_sphere_dataset(tmp_path / "new", n_subjects=12, size_mm=24, seed=7,
                               labelled=False)
    probs = tmp_path / "probs.csv"
    assert main(["cls", "predict", "--model", str(out), "--csv", str(new), "--out", str(probs),
                 "--device", "cpu"]) == 0
    with open(probs) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["subject"] for r in rows] == [f"sub7_{i:03d}" for i in range(12)]
    assert rows[0]["n_images"] == "2" and rows[1]["n_images"] == "1"
    p_ad = np.array([float(r["prob_AD"]) for r in rows])
    p_nc = np.array([float(r["prob_NC"]) for r in rows])
    np.testing.assert_allclose(p_ad + p_nc, 1, atol=1e-5)
    truth = np.arange(12) % 2  # AD for odd subjects
    assert roc_auc(truth, p_ad) > 0.9
    plans = json.loads((out / "plans.json").read_text())
    thr = np.mean([f["threshold"] for f in plans["folds"]])
    assert [r["predicted_class"] for r in rows] == ["AD" if p >= thr else "NC" for p in p_ad]
    # a model folder is never overwritten by accident
    code = main(["cls", "train", "--csv", str(root / "data" / "data.csv"), "--out", str(out)]
                + TRAIN_ARGS)
    assert code == 2
