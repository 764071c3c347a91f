"""End to end through the real nnU-Net commands on a tiny synthetic dataset (CPU).

plan_and_preprocess -> nnUNetv2_train -tr <our trainer>_smoke -device cpu -> nnUNetv2_predict,
then the predictions' shape, geometry and labels are checked against the inputs; a
training interrupted after its first epoch is continued with ``--c``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_mamba.demo import make_synthetic_dataset
from nnunet_mamba.nnunet.commands import nnunet_env

pytestmark = pytest.mark.slow
DATASET_ID = 987
BIN = Path(sys.executable).parent


def run(cmd, env, cwd=None, timeout=900):
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, cwd=cwd, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def planned(tmp_path_factory):
    """A tiny raw dataset, planned and preprocessed by nnU-Net (3d_fullres)."""
    work = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(work)
    env.pop("nnUNet_extTrainer", None)  # registration must come from the installed .pth
    folder = make_synthetic_dataset(work / "nnUNet_raw", DATASET_ID, "Tiny", num_train=5,
                                    num_test=2, shape=(28, 36, 32), spacing=(2.0, 1.0, 1.0))
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres",
         "-np", "2", "-npfp", "2"], env)
    return work, env, folder


def result_folder(work: Path, trainer: str) -> Path:
    return (work / "nnUNet_results" / f"Dataset{DATASET_ID:03d}_Tiny"
            / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0")


def test_train_predict_continue_nnmamba(planned):
    work, env, folder = planned
    trainer = "nnMambaTrainer_smoke"
    out = run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer,
               "-device", "cpu"], env)
    assert "Using trainer 'nnMambaTrainer_smoke'" in out
    fold = result_folder(work, trainer)
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == 1
    assert any(k.endswith("mamba.A_log") for k in ckpt["network_weights"])
    assert (fold / "validation" / "summary.json").exists()

    # prediction of unseen cases through nnU-Net's predictor
    pred = work / "pred"
    run(["nnUNetv2_predict", "-i", str(folder / "imagesTs"), "-o", str(pred), "-d",
         str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu",
         "-npp", "1", "-nps", "1"], env)
    inputs = sorted((folder / "imagesTs").glob("*_0000.nii.gz"))
    assert len(inputs) == 2
    for img_path in inputs:
        case = img_path.name.replace("_0000.nii.gz", ".nii.gz")
        p = sitk.ReadImage(str(pred / case))
        ref = sitk.ReadImage(str(img_path))
        assert p.GetSize() == ref.GetSize()
        np.testing.assert_allclose(p.GetSpacing(), ref.GetSpacing())
        np.testing.assert_allclose(p.GetOrigin(), ref.GetOrigin())
        np.testing.assert_allclose(p.GetDirection(), ref.GetDirection())
        labels = set(np.unique(sitk.GetArrayFromImage(p)).tolist())
        assert labels <= {0, 1, 2}

    # an interrupted run: the state after epoch 0 began, continued with --c
    ckpt["current_epoch"] = 0
    torch.save(ckpt, fold / "checkpoint_latest.pth")
    (fold / "checkpoint_final.pth").unlink()
    out = run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer,
               "-device", "cpu", "--c"], env)
    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 1
    key = next(k for k in resumed["network_weights"] if k.endswith("encoder.stem.0.0.weight"))
    assert not torch.equal(resumed["network_weights"][key], ckpt["network_weights"][key]), \
        "continued training did not change the weights"


def test_unknown_trainer_is_a_clear_error(planned):
    work, env, _ = planned
    proc = subprocess.run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0",
                           "-tr", "nnMambaTrainerDoesNotExist", "-device", "cpu"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Could not find requested nnunet trainer" in proc.stdout


# One smoke training per trainer code path: SegMambaTrainer trains (and predicts) in 3d_fullres
# and 2d in tests/test_configurations.py; BiSegMamba and SegMambaSkip share TamingSegMamba's
# trainer (optimiser, cosine schedule) and differ in the network only, which
# test_configurations builds in every configuration and runs forward/backward in 2d and 3d
# (MultiSegMamba has its own one-cycle schedule and stays here)
OTHER_TRAINERS = ["TamingSegMambaTrainer", "MultiSegMambaTrainer", "UMambaBotTrainer",
                  "UMambaEncTrainer", "UNETRTrainer"]
SMALL_ID = 988


@pytest.fixture(scope="session")
def planned_small(tmp_path_factory):
    """A smaller dataset (16 x 32 x 32, 1 mm): patch 16 x 32 x 32, divisible by 16 for UNETR."""
    work = tmp_path_factory.mktemp("nnunet_small")
    env = nnunet_env(work)
    env.pop("nnUNet_extTrainer", None)
    make_synthetic_dataset(work / "nnUNet_raw", SMALL_ID, "Small", num_train=5, num_test=0,
                           shape=(16, 32, 32), spacing=(1.0, 1.0, 1.0), seed=1)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(SMALL_ID), "-c", "3d_fullres",
         "-np", "2", "-npfp", "2"], env)
    # smoke runs of 2 iterations: augmentation in the training process (no workers filling
    # queues ahead on a 2-core CI machine), one export worker; the nnMamba test above and the
    # GPU-augmentation smoke test keep nnU-Net's worker processes
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"})
    return work, env


@pytest.mark.parametrize("trainer", OTHER_TRAINERS)
def test_other_trainers_train_in_nnunet(planned_small, trainer):
    work, env = planned_small
    name = f"{trainer}_smoke"
    out = run(["nnUNetv2_train", str(SMALL_ID), "3d_fullres", "0", "-tr", name, "-device", "cpu"],
              env)
    assert f"Using trainer '{name}'" in out
    fold = (work / "nnUNet_results" / f"Dataset{SMALL_ID:03d}_Small"
            / f"{name}__nnUNetPlans__3d_fullres" / "fold_0")
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == name
    assert (fold / "validation" / "summary.json").exists()
    if trainer != "UNETRTrainer":
        assert any("A_log" in k for k in ckpt["network_weights"]), "no Mamba in the network"
