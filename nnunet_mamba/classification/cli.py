"""``nnmamba cls``: 3D image classification with nnMamba (Gong et al. 2024, Sec. 2.3, 3.3).

  nnmamba cls train   --csv data.csv --out DIR   subject-level stratified k-fold CV
  nnmamba cls predict --model DIR --csv new.csv --out probs.csv

The CSV has a subject-id column (``subject``), one column per image channel (``image`` or
``image_0000``, ``image_0001``, ...; paths relative to the CSV) and a ``label`` column.
"""
from __future__ import annotations

import argparse

from ..errors import UserError
from ..networks.registry import CLASSIFICATION_NETWORKS
from .preprocessing import PreprocessingConfig
from .trainer import LR_SCHEDULES, OPTIMIZERS, TrainSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # defaults: the options dataclasses (TrainSettings, PreprocessingConfig), nowhere else
    s, pre = TrainSettings(), PreprocessingConfig()
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    t = sub.add_parser("train", help="cross-validated training and evaluation",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--csv", required=True, help="CSV: subject id, image column(s), label")
    t.add_argument("--out", required=True, help="output folder (models, results, plots)")
    t.add_argument("--id-column", default="subject")
    t.add_argument("--image-columns", nargs="+", default=None,
                   help="channel columns in order (default: columns named image*)")
    t.add_argument("--label-column", default="label")
    t.add_argument("--classes", nargs="+", default=None,
                   help="declared classes in order; for two classes the last is the positive "
                        "class (default: inferred from the labels, sorted)")
    t.add_argument("--target-spacing", nargs=3, type=float, default=None, metavar=("X", "Y", "Z"),
                   help="resample to this spacing in mm (default: median of the images)")
    t.add_argument("--size", nargs=3, type=int, default=list(pre.size), metavar=("X", "Y", "Z"),
                   help="centre crop / zero pad to this many voxels after resampling")
    t.add_argument("--orientation", default=pre.orientation, help="SimpleITK DICOMOrient code")
    t.add_argument("--nonzero-norm", action="store_true",
                   help="z-score over the non-zero region only (skull-stripped images)")
    t.add_argument("--model", choices=tuple(CLASSIFICATION_NETWORKS), default=s.model)
    t.add_argument("--base-channels", type=int, default=s.base_channels,
                   help="stem width; stages use 2x, 4x, 8x (paper: 32)")
    t.add_argument("--blocks-per-stage", type=int, default=s.blocks_per_stage,
                   help="residual blocks per encoder stage (paper: 3)")
    t.add_argument("--epochs", type=int, default=s.epochs)
    t.add_argument("--batch-size", type=int, default=s.batch_size)
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=s.optimizer,
                   help="paper Sec. 3.1: Adam; the authors' public classifier: AdamW lr 1e-4")
    t.add_argument("--lr", type=float, default=s.lr)
    t.add_argument("--weight-decay", type=float, default=s.weight_decay,
                   help="not applied to Mamba's A_log and D")
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=s.lr_schedule)
    t.add_argument("--folds", type=int, default=s.folds)
    t.add_argument("--val-fraction", type=float, default=s.val_fraction,
                   help="share of each fold's training subjects used for model selection")
    t.add_argument("--threshold", default=s.threshold,
                   help="binary decision threshold: 'youden' (chosen on validation) or a number")
    t.add_argument("--seed", type=int, default=s.seed)
    t.add_argument("--no-augment", action="store_true", help="train without augmentation")
    t.add_argument("--mirror-axes", nargs="*", type=int, default=list(s.mirror_axes),
                   help="array axes (0 z, 1 y, 2 x) for random mirroring; none to disable")
    t.add_argument("--device", default=s.device, help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--num-workers", type=int, default=s.num_workers,
                   help="data-loader worker processes")
    t.add_argument("--num-processes", type=int, default=s.num_processes,
                   help="preprocessing processes")
    t.add_argument("--overwrite", action="store_true", help="replace a model already in --out")

    p = sub.add_parser("predict", help="class probabilities per subject (fold ensemble)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the --out folder of 'nnmamba cls train'")
    p.add_argument("--csv", required=True, help="CSV with the training's id and image columns")
    p.add_argument("--out", required=True, help="output CSV of probabilities")
    p.add_argument("--folds", nargs="+", type=int, default=None, help="default: all folds")
    p.add_argument("--device", default=s.device)
    p.add_argument("--num-processes", type=int, default=s.num_processes,
                   help="preprocessing processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return _train(args)
    if args.action == "predict":
        from .predict import predict_csv
        predict_csv(args.model, args.csv, args.out, device=args.device, folds=args.folds,
                    num_processes=args.num_processes, overwrite=args.overwrite)
        return 0
    raise UserError(f"unknown action {args.action!r}; use train or predict")


def _train(args: argparse.Namespace) -> int:
    from .table import read_table
    from .trainer import cross_validate

    settings = TrainSettings(
        model=args.model, base_channels=args.base_channels,
        blocks_per_stage=args.blocks_per_stage, epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, folds=args.folds,
        val_fraction=args.val_fraction, threshold=args.threshold, seed=args.seed,
        augment=not args.no_augment, mirror_axes=tuple(args.mirror_axes),
        num_workers=args.num_workers, num_processes=args.num_processes, device=args.device)
    settings.check()
    config = PreprocessingConfig(orientation=args.orientation,
                                 target_spacing=args.target_spacing, size=tuple(args.size),
                                 nonzero_norm=args.nonzero_norm)
    table = read_table(args.csv, id_column=args.id_column, image_columns=args.image_columns,
                       label_column=args.label_column, classes=args.classes)
    results = cross_validate(table, config, settings, args.out, overwrite=args.overwrite,
                             id_column=args.id_column)
    roc = ", roc.png" if len(results["classes"]) == 2 else ""
    print(f"results: {args.out}/results.md, results.json{roc}; mean AUC "
          f"{results['mean']['AUC']:.4f} ± {results['std']['AUC']:.4f}")
    return 0
