"""``nnmamba brats2023``: BraTS 2023 GLI synthetic data, conversion to nnU-Net, evaluation.

    nnmamba brats2023 synth OUT --cases N [--shape 240 240 155] [--seed S]
    nnmamba brats2023 convert SRC -d ID [--name NAME] [--link|--copy] [--seed 12345]
                              [--nnunet-raw DIR] [--nnunet-preprocessed DIR] [--overwrite] [-j N]
    nnmamba brats2023 evaluate --pred DIR --ref DIR [--convention brats2023|nnunet-v1|segmamba|monai]
                               [--metrics legacy|lesionwise|both] [--out DIR] [-j N]
    nnmamba brats2023 reproduce SRC --trainers nnMambaTrainer nnUNetTrainer ... [-d ID] [--folds 5]
                                [--work DIR] [--out DIR] [--device cuda|cpu] [--gpus N] [--plans nnUNetPlans]
                                [--preset paper] [--convention brats2023] [--metrics both] [-j N] [--dry-run]
                                [--executor local|slurm] [--partition P] [--gpus-per-job N] [--time MIN|HH:MM:SS]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .convert import DEFAULT_NAME, DEFAULT_SEED, PAPER_FOLD
from .metrics import CONVENTIONS, METRICS, default_jobs
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
    p.add_argument("--name", default=DEFAULT_NAME, help="dataset name (default %(default)s)")
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

    p = sub.add_parser("evaluate", help="per-case, per-region Dice and HD95 (WT, TC, ET), whole-volume and lesion-wise",
                       description="Dice and HD95 (mm) per case and region, whole-volume (legacy, by --convention) "
                                   "and lesion-wise (the BraTS 2023 challenge's ranking metrics, with lesion counts); "
                                   "writes per_case.csv and summary.json. See docs/brats2023.md.")
    p.add_argument("--pred", required=True, metavar="DIR", help="predictions <case>.nii.gz (labels 0-3)")
    p.add_argument("--ref", required=True, metavar="DIR",
                   help="references: <case>.nii.gz files (e.g. labelsTs) or BraTS case folders")
    p.add_argument("--convention", choices=sorted(CONVENTIONS), default="brats2023",
                   help="whole-volume HD95 definition and values for empty masks (default brats2023): " +
                        "; ".join(f"{n}: {c.source}" for n, c in CONVENTIONS.items()))
    _add_metrics_argument(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: PRED/brats2023_metrics_<convention>)")
    p.add_argument("--overwrite", action="store_true", help="replace per_case.csv / summary.json in --out")
    p.add_argument("-j", "--jobs", type=int, default=default_jobs(), metavar="N",
                   help="processes (default %(default)s)")

    _add_reproduce_arguments(sub)


def _add_metrics_argument(p, default: str = "both") -> None:
    p.add_argument("--metrics", choices=METRICS, default=default,
                   help="legacy: whole-volume Dice / HD95 (by --convention); lesionwise: the BraTS 2023 challenge's "
                        "lesion-wise Dice / HD95 with lesion counts; both (default %(default)s)")


def _add_reproduce_arguments(sub) -> None:
    from .reproduce import option_defaults

    default = option_defaults()  # stated once, in ReproduceOptions
    p = sub.add_parser(
        "reproduce", help="the paper's Table 1: convert, plan, train, predict the test split, evaluate",
        description="The nnMamba paper's BraTS 2023 protocol (Sec. 3.2, Table 1) with stock nnU-Net, resumable: "
                    "convert SRC (70/10/20 split), nnUNetv2_plan_and_preprocess 3d_fullres, nnUNetv2_train the "
                    "chosen folds of every trainer (finished folds are skipped, interrupted ones continued with "
                    "--c; one fold per GPU at a time), nnUNetv2_predict the held-out test cases (ensemble of the "
                    "folds), Dice / HD95 per region, and the table in the paper's layout (Markdown, CSV), a box "
                    "plot (PNG) and reproduce.json with the protocol. See docs/brats2023.md.")
    p.add_argument("src", metavar="SRC", help="folder holding the BraTS-GLI-XXXXX-XXX case folders")
    p.add_argument("--trainers", nargs="+", required=True, metavar="TRAINER",
                   help="table rows: nnU-Net trainer classes (e.g. nnMambaTrainer SegMambaV2Trainer nnUNetTrainer), "
                        "TRAINER:PLANS for a trainer on its own plans, or nnUNetTrainer_ResEncM / _ResEncL / _ResEncXL "
                        "(nnUNetTrainer on nnU-Net's residual-encoder preset plans, planned by nnU-Net's planners)")
    p.add_argument("-d", "--dataset-id", type=int, default=default["dataset_id"], metavar="ID",
                   help="nnU-Net dataset ID (default %(default)s)")
    p.add_argument("--name", default=default["name"], help="dataset name (default %(default)s)")
    p.add_argument("--folds", type=int, nargs="+", default=list(default["folds"]), metavar="F",
                   help=f"folds to train and ensemble: {PAPER_FOLD} is the paper's 70%% train -> 10%% val split; "
                        "0 1 2 3 4 the 5-fold cross-validation over train + val (default "
                        f"{' '.join(map(str, default['folds']))})")
    p.add_argument("--work", default=default["work"], metavar="DIR",
                   help="keep nnUNet_raw, nnUNet_preprocessed and nnUNet_results in DIR (default: the folders of "
                        "the environment variables nnUNet_raw, nnUNet_preprocessed, nnUNet_results)")
    p.add_argument("--out", default=default["out"], metavar="DIR",
                   help="table, plot, metrics, predictions and logs (default: "
                        "$nnUNet_results/Dataset<ID>_<NAME>/reproduce_table1)")
    p.add_argument("--convention", choices=sorted(CONVENTIONS), default=default["convention"],
                   help="whole-volume HD95 definition and values for empty masks (default %(default)s)")
    _add_metrics_argument(p, default["metrics"])
    p.add_argument("--device", choices=("cuda", "cpu"), default=default["device"],
                   help="passed to nnU-Net's -device (default %(default)s)")
    p.add_argument("--gpus", type=int, default=default["gpus"], metavar="N",
                   help="trainings (and predictions) run at once, one per GPU (default: all visible GPUs)")
    p.add_argument("--plans", default=default["plans"], metavar="ID", help="plans identifier (default %(default)s)")
    p.add_argument("--preset", default=default["preset"], metavar="NAME|FILE",
                   help="plans preset applied on top of --plans, for the rows without their own plans (e.g. paper: "
                        "patch 128^3, batch 2; or a preset "
                        ".json file)")
    p.add_argument("--seed", type=int, default=default["seed"], help="split seed (default %(default)s)")
    mode = p.add_mutually_exclusive_group()
    for const, text in (("link", "symlink the source files into nnUNet_raw"), ("copy", "copy the source files")):
        mode.add_argument(f"--{const}", dest="mode", action="store_const", const=const,
                          help=text + (" (default)" if const == default["mode"] else ""))
    p.set_defaults(mode=default["mode"])
    p.add_argument("-j", "--jobs", type=int, default=default["jobs"], metavar="N",
                   help="processes for validation, preprocessing and evaluation; trainings at once with --device cpu "
                        "(default %(default)s)")
    p.add_argument("--dry-run", action="store_true", default=default["dry_run"],
                   help="print the plan of commands; run and write nothing")
    g = p.add_argument_group("where the trainings and predictions run (through submitit)")
    g.add_argument("--executor", choices=("local", "slurm"), default=default["executor"],
                   help="local: this machine, one job per GPU (-j at once on the CPU); slurm: one Slurm job per "
                        "fold, submitted from here (default %(default)s)")
    g.add_argument("--partition", default=default["partition"], metavar="P",
                   help="Slurm partition (default: the cluster's default partition)")
    g.add_argument("--gpus-per-job", type=int, default=default["gpus_per_job"], metavar="N",
                   help="GPUs of one Slurm training job (default 1; more: nnU-Net's -num_gpus DDP)")
    g.add_argument("--time", default=default["time"], metavar="MIN|HH:MM:SS",
                   help="Slurm time limit of one job, in minutes or HH:MM:SS (required with --executor slurm); "
                        "a job that reaches it is requeued and continues from its last checkpoint")


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
        from ..safe_io import check_output_dir
        from .metrics import evaluate_folder, format_table, write_results

        out = Path(args.out) if args.out else Path(args.pred) / f"brats2023_metrics_{args.convention}"
        check_output_dir(out, getattr(args, "overwrite", False), names=("per_case.csv", "summary.json"))
        summary = evaluate_folder(args.pred, args.ref, args.convention, n_jobs=args.jobs, metrics=args.metrics)
        csv_path, json_path = write_results(summary, out)
        if summary["ignored_predictions"]:
            print(f"note: {len(summary['ignored_predictions'])} prediction(s) without a reference were ignored: "
                  f"{', '.join(summary['ignored_predictions'][:5])}")
        print(f"{summary['n_cases']} case(s), metrics {args.metrics}, convention {args.convention}; whole-volume "
              f"HD95: {summary['library']}")
        for line in summary["warnings"]:
            print(f"warning: {line}")
        print(format_table(summary))
        print(f"wrote {csv_path} and {json_path}")
        return 0
    if args.brats_command == "reproduce":
        from .reproduce import ReproduceOptions, reproduce

        reproduce(ReproduceOptions(
            src=Path(args.src), trainers=tuple(args.trainers), dataset_id=args.dataset_id, name=args.name,
            folds=tuple(args.folds), work=Path(args.work) if args.work else None,
            out=Path(args.out) if args.out else None, convention=args.convention, metrics=args.metrics,
            device=args.device,
            gpus=args.gpus, plans=args.plans, preset=args.preset, seed=args.seed, mode=args.mode, jobs=args.jobs,
            dry_run=args.dry_run, executor=args.executor, partition=args.partition, gpus_per_job=args.gpus_per_job,
            time=args.time))
        return 0
    raise AssertionError(args.brats_command)
