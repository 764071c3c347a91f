"""``nnmamba landmarks``: 3D landmark detection with nnMamba (Gong et al. 2024, Sec. 3.4).

    nnmamba landmarks train --data DIR --out DIR [--size 128 128 128] [--sigma 5]
                            [--epochs 80] [--batch-size 2] [--folds 5] [--fold K ...]
                            [--model nnmamba|resunet] [--lr 1e-3] [--weight-decay 0]
                            [--flip-pairs LEFT:RIGHT ...] [--device auto]
    nnmamba landmarks predict --model DIR --images DIR --out DIR [--folds K ...]
                              [--checkpoint final|best] [--format json|slicer|fcsv]
                              [--device auto]
    nnmamba landmarks evaluate --pred DIR --ref DIR [--out DIR]
    nnmamba landmarks synth OUT --cases N [--seed S]

Dataset layout: DIR/images/<CASE>.nii.gz (any SimpleITK format) and
DIR/landmarks/<CASE>.json ({"landmarks": {"name": [x, y, z]}}), <CASE>.csv
(name,x,y,z), or 3D Slicer markups <CASE>.fcsv / <CASE>.mrk.json (RAS or LPS as their
header says); world coordinates in mm, turned into the image's ITK/LPS frame.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UserError


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..networks.registry import LANDMARK_NETWORKS
    from .augment import AugmentationConfig
    from .training import TrainingConfig

    # defaults: the options dataclasses; values are checked once, by TrainingConfig.check
    d, aug = TrainingConfig(), AugmentationConfig()
    sub = parser.add_subparsers(dest="landmarks_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "train", help="train heatmap networks with k-fold cross-validation",
        description="Resample every volume to --size, regress Gaussian heatmaps (MSE, Adam) and "
                    "train one network per cross-validation fold. Writes config.json, "
                    "splits.json, per-fold checkpoints, logs and curves (progress.png), and "
                    "the cross-validation MRE (cv_evaluation/summary.md) into --out.")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="dataset folder: images/<CASE>.nii.gz + landmarks/<CASE>.json|csv")
    p.add_argument("--out", required=True, metavar="DIR", help="model output folder")
    p.add_argument("--size", type=int, nargs=3, default=list(d.size),
                   metavar=("X", "Y", "Z"), help="working grid in voxels, image index order "
                   "(default %(default)s, the paper's)")
    p.add_argument("--sigma", type=float, default=d.sigma,
                   help="Gaussian heatmap sigma in working-grid voxels (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="batch size (default %(default)s)")
    p.add_argument("--folds", type=int, default=d.folds,
                   help="number of cross-validation folds (default %(default)s; 1 = train on all "
                        "cases)")
    p.add_argument("--fold", type=int, nargs="+", default=None, metavar="K",
                   help="train only these folds (default: all); run again with others to add "
                        "folds to the same --out")
    p.add_argument("--model", choices=tuple(LANDMARK_NETWORKS), default=d.model,
                   help="nnmamba (one Mamba layer at the first block) or resunet (the "
                        "residual U-Net baseline of Table 3); default %(default)s")
    p.add_argument("--base-channels", type=int, default=d.base_channels,
                   help="stem width; stages use 2x, 4x, 8x (default %(default)s)")
    p.add_argument("--blocks-per-stage", type=int, default=d.blocks_per_stage,
                   help="residual blocks per encoder stage (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="Adam learning rate (default %(default)s, the authors' landmark code; the "
                        "paper's Sec. 3.1 states 2e-3)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="Adam weight decay, not on Mamba's A_log and D (default %(default)s; "
                        "Sec. 3.1 states 1e-3)")
    p.add_argument("--iterations-per-epoch", type=int, default=d.iterations_per_epoch,
                   help="default: one pass over the training cases")
    p.add_argument("--val-every", type=int, default=d.val_every,
                   help="validate every N epochs (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of splits, init, augmentation")
    p.add_argument("--flip-pairs", nargs="+", default=None, metavar="LEFT:RIGHT",
                   help="left/right landmark pairs; enables mirroring along --flip-axis with "
                        "the pair's names swapped (no flips without pairs)")
    p.add_argument("--flip-axis", choices=("x", "y", "z"), default=aug.flip_axis,
                   help="image index axis of the mirror (default %(default)s)")
    p.add_argument("--rotation", type=float, default=aug.rotation_deg, metavar="DEG",
                   help="max rotation per axis in degrees (default %(default)s; 0 = off)")
    p.add_argument("--scale", type=float, default=aug.scale,
                   help="max isotropic zoom, 1 +- scale (default %(default)s; 0 = off)")
    p.add_argument("--translation", type=float, default=aug.translation,
                   help="max shift as a fraction of the size (default %(default)s; 0 = off)")
    p.add_argument("--no-augmentation", action="store_true",
                   help="switch off all augmentation (affine, flips, intensity)")
    p.add_argument("--no-antialias", action="store_true",
                   help="resample without Gaussian smoothing before down-sizing")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="retrain folds that exist in --out")
    p.add_argument("--quiet", action="store_true", help="log to files only")

    p = sub.add_parser(
        "predict", help="landmarks of new volumes (world mm, JSON per case)",
        description="Resample each image as in training, average the heatmaps of the fold "
                    "models, decode them (arg-max + local soft-argmax) and write "
                    "<CASE>.json with world coordinates (mm, LPS), confidences (peak heatmap "
                    "value, ~1 = sure) and the continuous voxel index.")
    p.add_argument("--model", required=True, metavar="DIR", help="the --out folder of train")
    p.add_argument("--images", required=True, metavar="DIR",
                   help="folder of volumes (<CASE>.nii.gz etc.), or a dataset folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--folds", type=int, nargs="+", default=None, metavar="K",
                   help="fold models to ensemble (default: all trained folds)")
    p.add_argument("--checkpoint", choices=("final", "best"), default="final",
                   help="final (default) or best (lowest validation MRE) weights")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no per-case lines")
    p.add_argument("--overwrite", action="store_true", help="replace <CASE>.json files already in --out")
    p.add_argument("--format", choices=("json", "slicer", "fcsv"), default="json",
                   help="json (default: our format, with confidences and voxel indices), slicer "
                        "(3D Slicer <CASE>.mrk.json) or fcsv (Slicer's <CASE>.fcsv); LPS, "
                        "confidence in each point's description")

    p = sub.add_parser(
        "evaluate", help="MRE (mm) and success detection rates",
        description="Radial error in mm per case and landmark; MRE ± SD per landmark and "
                    "overall; SDR within 2, 2.5, 3 and 4 mm. Writes summary.json, "
                    "summary.md and per_case.csv.")
    p.add_argument("--pred", required=True, metavar="DIR", help="predicted <CASE>.json files")
    p.add_argument("--ref", required=True, metavar="DIR",
                   help="reference landmark files, or a dataset folder holding landmarks/")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: PRED/evaluation)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs already in --out")

    p = sub.add_parser("synth", help="write a small synthetic landmark dataset",
                       description="Oblique, anisotropic noisy volumes with three blob "
                                   "landmarks (bright, dark, wide) in the dataset layout.")
    p.add_argument("out", metavar="OUT", help="dataset folder to create")
    p.add_argument("--cases", type=_positive_int, required=True, help="number of cases")
    p.add_argument("--size", type=_positive_int, nargs=3, default=[32, 32, 24],
                   metavar=("X", "Y", "Z"), help="voxels (default 32 32 24) over a 32 mm cube")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing folder")


def _augmentation(args):
    from .augment import AugmentationConfig, no_augmentation, parse_flip_pairs

    if args.no_augmentation:
        if args.flip_pairs:
            raise UserError("--flip-pairs and --no-augmentation exclude each other.")
        return no_augmentation()
    try:
        pairs = parse_flip_pairs(args.flip_pairs)
    except ValueError as e:
        raise UserError(f"--flip-pairs: {e}.") from None
    return AugmentationConfig(rotation_deg=args.rotation, scale=args.scale,
                              translation=args.translation, flip_pairs=pairs,
                              flip_axis=args.flip_axis)


def run(args) -> int:
    cmd = args.landmarks_command
    if cmd == "train":
        from ..runkit import resolve_device
        from .training import TrainingConfig, train_cross_validation

        cfg = TrainingConfig(model=args.model, base_channels=args.base_channels,
                             blocks_per_stage=args.blocks_per_stage, size=tuple(args.size),
                             sigma=args.sigma, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, weight_decay=args.weight_decay, folds=args.folds,
                             seed=args.seed, antialias=not args.no_antialias,
                             iterations_per_epoch=args.iterations_per_epoch,
                             val_every=args.val_every, augmentation=_augmentation(args))
        result = train_cross_validation(args.data, args.out, cfg, args.fold,
                                        resolve_device(args.device), args.overwrite,
                                        echo=not args.quiet)
        if result["cv"] is None and cfg.folds > 1:
            done = sorted(result["folds"])
            print(f"trained fold(s) {', '.join(map(str, done))}; the cross-validation summary is "
                  f"written once all {cfg.folds} folds are trained into {args.out}")
        return 0

    if cmd == "predict":
        from ..safe_io import check_output_dir
        from ..runkit import resolve_device
        from .inference import load_model, predict_folder
        from .io import list_images
        from .markups import FORMAT_SUFFIXES

        images = Path(args.images)
        if (images / "images").is_dir():
            images = images / "images"
        # outputs checked before any work: no existing <CASE>.json without --overwrite (e.g. the
        # dataset's reference landmarks), never the image or model folder
        suffix = FORMAT_SUFFIXES[args.format]
        check_output_dir(args.out, args.overwrite, names=[f"{c}{suffix}" for c in list_images(images)],
                         inputs=[images, args.model])
        device = resolve_device(args.device)
        model = load_model(args.model, args.folds, args.checkpoint, device)
        cases = predict_folder(model, images, args.out, device,
                               log=None if args.quiet else print, fmt=args.format)
        print(f"predicted {len(cases)} case(s) with fold(s) {', '.join(map(str, model.folds))} "
              f"into {args.out}")
        return 0

    if cmd == "evaluate":
        from .metrics import evaluate_folders, markdown_table

        from ..safe_io import check_output_dir
        from .io import landmark_folder

        out = args.out if args.out is not None else str(Path(args.pred) / "evaluation")
        if os.path.realpath(args.pred) == os.path.realpath(landmark_folder(args.ref)):
            raise UserError(f"--pred {args.pred} and --ref {args.ref} are the same landmark folder; "
                            "every error would be 0. Pass the predictions' folder as --pred")
        check_output_dir(out, args.overwrite, names=("summary.json", "summary.md", "per_case.csv"),
                         inputs=[args.pred, landmark_folder(args.ref)])
        summary = evaluate_folders(args.pred, args.ref, out)
        print(markdown_table(summary))
        if summary["unscored_predictions"]:
            print(f"not scored (no reference): {', '.join(summary['unscored_predictions'])}")
        print(f"written {Path(out) / 'summary.json'}, summary.md, per_case.csv")
        return 0

    if cmd == "synth":
        from .synth import synthesize_dataset

        ids = synthesize_dataset(args.out, args.cases, tuple(args.size), args.seed,
                                 overwrite=args.overwrite)
        print(f"wrote {len(ids)} synthetic case(s) into {args.out}")
        return 0
    raise UserError(f"unknown action {cmd!r}")
