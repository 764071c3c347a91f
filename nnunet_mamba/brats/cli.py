"""``nnmamba brats2023``: BraTS 2023 GLI synthetic data, conversion to nnU-Net, evaluation.

    nnmamba brats2023 synth OUT --cases N [--shape 240 240 155] [--seed S]
    nnmamba brats2023 convert SRC -d ID [--name NAME] [--link|--copy] [--seed 12345]
                              [--nnunet-raw DIR] [--nnunet-preprocessed DIR] [--overwrite] [-j N]
    nnmamba brats2023 evaluate --pred DIR --ref DIR [--convention brats2023|nnunet-v1|segmamba]
                               [--out DIR] [-j N]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .convert import DEFAULT_SEED, PAPER_FOLD
from .metrics import CONVENTIONS, default_jobs
from .synth import BRATS_SHAPE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="brats_command", metavar="ACTION", required=True)

    p = sub.add_parser("synth", help="write a synthetic data set in the BraTS 2023 layout",
                       description="Write N synthetic cases (four modalities + seg) in the BraTS 2023 GLI layout.")
    p.add_argument("out", metavar="OUT", help="output folder (case folders are created inside)")
    p.add_argument("--cases", type=int, required=True, metavar="N", help="number of cases")
    p.add_argument("--shape", type=int, nargs=3, default=list(BRATS_SHAPE), metavar=("X", "Y", "Z"),
                   help="image size in voxels (default: 240 240 155, the BraTS grid); spacing is 1 mm")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same data")
    p.add_argument("--overwrite", action="store_true", help="replace existing case folders")

    p = sub.add_parser("convert", help="BraTS layout -> nnU-Net raw dataset with the paper's 70/10/20 split",
                       description="Validate every case, then write Dataset<ID>_<NAME> into nnUNet_raw "
                                   "(train+val in imagesTr, the 20%% test cases in imagesTs/labelsTs) and "
                                   "splits_final.json (folds 0-4: 5-fold CV over train+val; fold "
                                   f"{PAPER_FOLD}: the paper's train -> val split).")
    p.add_argument("src", metavar="SRC", help="folder holding the BraTS-GLI-XXXXX-XXX case folders")
    p.add_argument("-d", "--dataset-id", type=int, required=True, metavar="ID", help="nnU-Net dataset ID (1-999)")
    p.add_argument("--name", default="BraTS2023GLI", help="dataset name (default BraTS2023GLI)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--link", dest="mode", action="store_const", const="link",
                      help="symlink the source files (default; copies where symlinks are impossible)")
    mode.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy the source files")
    p.set_defaults(mode="link")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"split seed (default {DEFAULT_SEED})")
    p.add_argument("--nnunet-raw", default=None, metavar="DIR", help="default: $nnUNet_raw")
    p.add_argument("--nnunet-preprocessed", default=None, metavar="DIR", help="default: $nnUNet_preprocessed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    p.add_argument("-j", "--jobs", type=int, default=default_jobs(), metavar="N",
                   help="processes for validation (default %(default)s)")

    p = sub.add_parser("evaluate", help="per-case, per-region Dice and HD95 (WT, TC, ET)",
                       description="Dice and HD95 (mm) per case and region; writes per_case.csv and summary.json.")
    p.add_argument("--pred", required=True, metavar="DIR", help="predictions <case>.nii.gz (labels 0-3)")
    p.add_argument("--ref", required=True, metavar="DIR",
                   help="references: <case>.nii.gz files (e.g. labelsTs) or BraTS case folders")
    p.add_argument("--convention", choices=sorted(CONVENTIONS), default="brats2023",
                   help="values for empty masks (default brats2023): " +
                        "; ".join(c.source for c in CONVENTIONS.values()))
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: PRED/brats2023_metrics_<convention>)")
    p.add_argument("-j", "--jobs", type=int, default=default_jobs(), metavar="N",
                   help="processes (default %(default)s)")


def run(args) -> int:
    if args.brats_command == "synth":
        from .synth import synthesize_dataset

        cases = synthesize_dataset(args.out, args.cases, tuple(args.shape), args.seed, overwrite=args.overwrite,
                                   verbose=True)
        print(f"wrote {len(cases)} synthetic case(s) of size {tuple(args.shape)} into {args.out}")
        return 0

    if args.brats_command == "convert":
        from .convert import convert_brats

        result = convert_brats(args.src, args.dataset_id, name=args.name, mode=args.mode, seed=args.seed,
                               nnunet_raw=args.nnunet_raw, nnunet_preprocessed=args.nnunet_preprocessed,
                               overwrite=args.overwrite, n_jobs=args.jobs, verbose=True)
        s = result.split
        print(f"wrote {result.dataset_dir} ({result.files}): {len(s.train)} train + {len(s.val)} val cases in "
              f"imagesTr, {len(s.test)} test cases in imagesTs/labelsTs (seed {s.seed})")
        print(f"wrote {result.preprocessed_splits} (folds 0-4: 5-fold CV over train+val; fold {PAPER_FOLD}: "
              "the paper's train -> val split)")
        print(f"next: nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres --verify_dataset_integrity")
        return 0

    if args.brats_command == "evaluate":
        from .metrics import evaluate_folder, format_table, write_results

        summary = evaluate_folder(args.pred, args.ref, args.convention, n_jobs=args.jobs)
        out = Path(args.out) if args.out else Path(args.pred) / f"brats2023_metrics_{args.convention}"
        csv_path, json_path = write_results(summary, out)
        if summary["ignored_predictions"]:
            print(f"note: {len(summary['ignored_predictions'])} prediction(s) without a reference were ignored: "
                  f"{', '.join(summary['ignored_predictions'][:5])}")
        print(f"{summary['n_cases']} case(s), convention {args.convention}; HD95 by {summary['library']}")
        print(format_table(summary))
        print(f"wrote {csv_path} and {json_path}")
        return 0
    raise AssertionError(args.brats_command)
