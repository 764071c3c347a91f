"""Does GPU augmentation learn like nnU-Net's CPU augmentation? (GPU machine; not a CI test.)

Synthetic BraTS 2023 cases (``nnmamba brats2023 synth`` + ``convert``: region-based training,
4 modalities), planned and preprocessed by nnU-Net, then the SAME trainer trained for the same
epochs on the same folds twice through ``nnUNetv2_train``: once with nnU-Net's CPU
augmentation (``NNUNET_MAMBA_GPU_AUGMENTATION=0``) and once with the batched GPU path
(``=1``), into separate ``nnUNet_results`` folders. Reported per run: the final pseudo Dice
(nnU-Net's per-epoch validation Dice and its EMA, from the checkpoint's log), nnU-Net's
validation Dice of the fold (``validation/summary.json``) and the mean epoch time. The
verdict compares the CPU-GPU difference of the means with the spread between folds.

    python scripts/check_gpu_augmentation_learning.py WORK [--trainer nnUNetTrainer_GPUAug_5epochs]
        [--folds 0 1 2] [--cases 30] [--shape 160 160 128] [--device cuda]
    python scripts/check_gpu_augmentation_learning.py WORK --dry-run   # tiny, CPU, minutes

Any trainer of ours works (``nnMambaTrainer_5epochs``, ...): they all carry the GPU path.
Writes ``WORK/learning_check.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def nnunet(module: str, fn: str, *args: str, env: dict, log: Path | None = None) -> None:
    """One of nnU-Net's console entry points, run as a module function (works without scripts)."""
    code = f"import sys; from {module} import {fn} as f; sys.argv[0] = '{fn}'; sys.exit(f())"
    out = open(log, "w") if log else None
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, stdout=out or None,
                              stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()
    if proc.returncode != 0:
        tail = log.read_text()[-4000:] if log else ""
        raise SystemExit(f"{fn} {' '.join(args)} failed (exit {proc.returncode})\n{tail}")


def prepare(work: Path, args, env: dict) -> None:
    if (work / "preprocessed" / f"Dataset{args.dataset_id:03d}_{args.name}" / "nnUNetPlans.json").exists():
        print("data already planned and preprocessed in", work)
        return
    cli = [sys.executable, "-m", "nnunet_mamba.cli", "brats2023"]
    subprocess.run([*cli, "synth", str(work / "brats_src"), "--cases", str(args.cases), "--shape",
                    *map(str, args.shape), "--overwrite"], env=env, check=True)
    subprocess.run([*cli, "convert", str(work / "brats_src"), "-d", str(args.dataset_id), "--name",
                    args.name, "--overwrite"], env=env, check=True)
    nnunet("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "plan_and_preprocess_entry",
           "-d", str(args.dataset_id), "-c", "3d_fullres", "-np", str(args.np), "-npfp", str(args.np),
           env=env)


def result(work: Path, mode: str, args, fold: int) -> dict:
    import torch
    fold_dir = (work / f"results_{mode}" / f"Dataset{args.dataset_id:03d}_{args.name}"
                / f"{args.trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}")
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    log = ckpt["logging"]
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    epoch_times = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    logs = sorted(fold_dir.glob("training_log_*.txt"))
    gpu_line = [ln for ln in logs[-1].read_text().splitlines() if "GPU augmentation" in ln] if logs else []
    return {"mode": mode, "fold": fold, "pseudo_dice_last": float(log["mean_fg_dice"][-1]),
            "pseudo_dice_ema": float(log["ema_fg_dice"][-1]),
            "pseudo_dice_per_epoch": [float(x) for x in log["mean_fg_dice"]],
            "train_loss_last": float(log["train_losses"][-1]),
            "validation_dice": float(summary["foreground_mean"]["Dice"]),
            "epoch_time_s": float(np.mean(epoch_times[1:] or epoch_times)),
            "augmentation_log": gpu_line[-1].split(": ", 1)[-1].strip() if gpu_line else "?"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--trainer", default="nnUNetTrainer_GPUAug_5epochs")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--shape", type=int, nargs=3, default=[160, 160, 128])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dataset-id", type=int, default=924)
    p.add_argument("--name", default="BraTSAugCheck")
    p.add_argument("--np", type=int, default=8, help="processes for preprocessing")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny CPU check of the script itself: 12 cases of 48^3, the _smoke trainer, 1 fold")
    args = p.parse_args(argv)
    if args.dry_run:
        args.cases, args.shape, args.device, args.folds, args.np = 12, [48, 48, 40], "cpu", [0], 2
        if not args.trainer.endswith("_smoke"):
            args.trainer = re.sub(r"_(\d+epochs?|demo)$", "", args.trainer) + "_smoke"
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_compile": os.environ.get("nnUNet_compile", "false")}
    prepare(work, args, env)

    rows = []
    for mode, flag in (("cpu", "0"), ("gpu", "1")):
        for fold in args.folds:
            run_env = {**env, "nnUNet_results": str(work / f"results_{mode}"),
                       "NNUNET_MAMBA_GPU_AUGMENTATION": flag}
            t0 = time.time()
            print(f"training {args.trainer} fold {fold} with {mode.upper()} augmentation ...", flush=True)
            nnunet("nnunetv2.run.run_training", "run_training_entry", str(args.dataset_id), "3d_fullres",
                   str(fold), "-tr", args.trainer, "-device", args.device, env=run_env,
                   log=work / f"train_{mode}_fold{fold}.log")
            row = result(work, mode, args, fold)
            row["wall_s"] = time.time() - t0
            rows.append(row)
            print(f"  {mode} fold {fold}: pseudo Dice {row['pseudo_dice_last']:.4f} (EMA "
                  f"{row['pseudo_dice_ema']:.4f}), validation Dice {row['validation_dice']:.4f}, "
                  f"epoch {row['epoch_time_s']:.1f} s [{row['augmentation_log']}]", flush=True)

    verdict = {}
    for key in ("pseudo_dice_last", "pseudo_dice_ema", "validation_dice"):
        cpu = np.array([r[key] for r in rows if r["mode"] == "cpu"])
        gpu = np.array([r[key] for r in rows if r["mode"] == "gpu"])
        diff = float(gpu.mean() - cpu.mean())
        # noise: the fold-to-fold spread of either mode (one fold: no estimate, 0.02 Dice)
        spread = float(np.sqrt((cpu.var(ddof=1) + gpu.var(ddof=1)) / 2)) if len(cpu) > 1 else 0.02
        verdict[key] = {"cpu_mean": float(cpu.mean()), "gpu_mean": float(gpu.mean()), "gpu_minus_cpu": diff,
                        "fold_spread_sd": spread, "within_noise": abs(diff) <= max(2 * spread, 0.01)}
        print(f"{key:18s} CPU {cpu.mean():.4f}  GPU {gpu.mean():.4f}  diff {diff:+.4f}  fold sd "
              f"{spread:.4f}  -> {'within noise' if verdict[key]['within_noise'] else 'DIFFERENT'}")
    out = {"trainer": args.trainer, "folds": args.folds, "cases": args.cases, "shape": args.shape,
           "device": args.device, "runs": rows, "verdict": verdict}
    (work / "learning_check.json").write_text(json.dumps(out, indent=1))
    print("wrote", work / "learning_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
