"""``nnmamba demo``: the whole nnU-Net workflow with nnMambaTrainer on a small synthetic set.

It writes a synthetic 3D dataset in nnU-Net's raw format (spheres and boxes of two labels
in noise), then runs the real nnU-Net commands -- ``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_train ... -tr nnMambaTrainer_demo -device cpu``, ``nnUNetv2_predict`` -- and
prints the Dice of the held-out predictions. Everything lives under ``--workdir``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .errors import UserError


def make_synthetic_dataset(raw_root: Path, dataset_id: int = 901, name: str = "NNMambaDemo",
                           num_train: int = 8, num_test: int = 2, shape=(40, 48, 44),
                           spacing=(1.5, 1.0, 1.0), seed: int = 0) -> Path:
    """Write ``DatasetXXX_name`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json).

    One MR-like channel; label 1 a sphere, label 2 a box, both brighter than the noisy
    background, at random positions. Returns the dataset folder.
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(num_train + num_test):
        seg = np.zeros(shape, np.uint8)
        m = min(shape)
        r = rng.uniform(0.15, 0.22) * m
        c = [rng.integers(int(r) + 1, s - int(r) - 1) for s in shape]
        seg[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r] = 1
        ext = [rng.integers(max(3, m // 6), max(4, m // 4) + 1) for _ in shape]
        lo = [rng.integers(1, s - e) for s, e in zip(shape, ext)]
        box = tuple(slice(a, a + e) for a, e in zip(lo, ext))
        seg[box] = np.where(seg[box] == 0, 2, seg[box])
        img = rng.normal(0, 1, shape) + 3.0 * (seg == 1) + 1.8 * (seg == 2)
        split, case = ("Tr", f"demo_{i:03d}") if i < num_train else ("Ts", f"demo_{i:03d}")
        for arr, path in ((img.astype(np.float32), folder / f"images{split}" / f"{case}_0000.nii.gz"),
                          (seg, folder / f"labels{split}" / f"{case}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(tuple(float(s) for s in reversed(spacing)))
            sitk.WriteImage(im, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "sphere": 1, "box": 2},
        "numTraining": num_train,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "synthetic demo data of nnunet-mamba",
    }, indent=2))
    return folder


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels) -> dict[int, float]:
    out = {}
    for lab in labels:
        p, r = pred == lab, ref == lab
        denom = p.sum() + r.sum()
        out[lab] = float(2 * (p & r).sum() / denom) if denom else 1.0
    return out


def nnunet_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(workdir / "nnUNet_raw"),
        "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
        "nnUNet_results": str(workdir / "nnUNet_results"),
        "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "2"),
        "nnUNet_def_n_proc": env.get("nnUNet_def_n_proc", "2"),
        "nnUNet_compile": "false",
    })
    return env


def run_command(cmd: list[str], env: dict[str, str], log=None) -> None:
    """Run an nnU-Net command (from this Python's bin folder), failing loudly."""
    exe = Path(sys.executable).parent / cmd[0]
    full = [str(exe) if exe.exists() else cmd[0], *cmd[1:]]
    t0 = time.time()
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(full, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
    if proc.returncode != 0:
        where = f" (log: {log.name})" if log is not None else ""
        raise UserError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}{where}")
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="nnmamba_demo", help="where data and results go")
    parser.add_argument("--trainer", default="nnMambaTrainer_demo",
                        help="trainer to run (default: nnMambaTrainer_demo, 8 short epochs)")
    parser.add_argument("--dataset-id", type=int, default=901)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", type=int, default=8, help="training cases")


def run(args) -> int:
    import SimpleITK as sitk

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(workdir)
    folder = make_synthetic_dataset(workdir / "nnUNet_raw", args.dataset_id, num_train=args.cases)
    print(f"synthetic dataset: {folder}")
    d = str(args.dataset_id)
    with open(workdir / "nnunet.log", "w") as log:
        run_command(["nnUNetv2_plan_and_preprocess", "-d", d, "-c", "3d_fullres", "-np", "2",
                     "-npfp", "2", "--verify_dataset_integrity"], env, log)
        run_command(["nnUNetv2_train", d, "3d_fullres", "0", "-tr", args.trainer,
                     "-device", args.device], env, log)
        pred = workdir / "predictions"
        run_command(["nnUNetv2_predict", "-i", str(folder / "imagesTs"), "-o", str(pred),
                     "-d", d, "-c", "3d_fullres", "-f", "0", "-tr", args.trainer,
                     "-device", args.device, "-npp", "1", "-nps", "1"], env, log)
    print("held-out Dice (sphere, box):")
    for ref_path in sorted((folder / "labelsTs").glob("*.nii.gz")):
        pred_path = pred / ref_path.name
        if not pred_path.exists():
            raise UserError(f"no prediction {pred_path} for {ref_path.name}; see {workdir / 'nnunet.log'}")
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_path)))
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_path)))
        dice = dice_per_label(p, r, (1, 2))
        print(f"  {ref_path.name}: {dice[1]:.3f} {dice[2]:.3f}")
    return 0
