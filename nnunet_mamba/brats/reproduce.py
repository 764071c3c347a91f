"""``nnmamba brats2023 reproduce``: the nnMamba paper's BraTS 2023 table (Table 1) in one command.

The protocol of the paper's Sec. 3.2 with stock nnU-Net v2, resumable at every step:

1. **Convert** the BraTS 2023 GLI training set (``SRC``, case folders) with
   :func:`~.convert.convert_brats`: 70 / 10 / 20 train / val / test split from a fixed seed,
   ``splits_final.json`` with folds 0-4 (5-fold CV over train + val) and fold
   :data:`~.convert.PAPER_FOLD` (the paper's train -> val split). Skipped when the dataset
   exists with the same split record (``split.json``); a different record is an error.
2. **Plan and preprocess** ``3d_fullres`` (``nnUNetv2_plan_and_preprocess``); skipped when the
   plans and the preprocessed data of every training case exist. Optionally a plans preset
   (``--preset paper``: patch 128^3, batch 2; or a preset JSON file) is applied on top with
   :func:`nnunet_mamba.nnunet.plans_presets.apply_preset`. Rows on their own plans (``TRAINER:PLANS``,
   or nnU-Net's residual-encoder baselines ``nnUNetTrainer_ResEncM`` / ``_ResEncL``, see
   :mod:`.baselines`) get those plans from nnU-Net's own planner (``nnUNetv2_plan_experiment
   -pl nnUNetPlannerResEncM`` once the fingerprint exists; the 3d_fullres data are shared) and
   train on them as planned, on the same split.
3. **Train** the chosen folds of every trainer with ``nnUNetv2_train``: a fold with
   ``checkpoint_final.pth`` is skipped, one with ``checkpoint_latest.pth`` (or ``_best``) is
   continued with ``--c``. The jobs go through submitit (:mod:`.jobs`): ``--executor local``
   runs them on this machine, one fold per GPU at a time (``CUDA_VISIBLE_DEVICES`` per
   process; ``-j`` at a time on the CPU); ``--executor slurm`` submits one Slurm job per fold
   (``--partition``, ``--gpus-per-job``, ``--time``) and waits for them.
4. **Predict** the held-out test cases (``imagesTs``) with ``nnUNetv2_predict -f <folds>``
   (nnU-Net averages the folds' logits: an ensemble when several folds are given); skipped
   when a stamp file shows that complete predictions were made from the same checkpoints.
   Prediction jobs are submitted once every training has finished (see :func:`reproduce`).
5. **Evaluate** with :func:`~.metrics.evaluate_folder` against ``labelsTs`` and write the
   table in the layout of the paper's Table 1 (Markdown and CSV), a box plot of the per-case
   Dice and HD95 (PNG), and ``reproduce.json`` with every number and the protocol.

Unknown trainers, a network that cannot be built for the plans (e.g. UNETR with a patch not
divisible by 16), missing folders and bad options are reported before any long step runs.
``--dry-run`` prints the plan of commands without running or writing anything.

This module holds the options and the protocol; the steps are in :mod:`.steps`, the
executors in :mod:`.jobs`, the table in :mod:`.table1`, the record in :mod:`.provenance`, and
everything about nnU-Net itself (folders, commands, trainers, plans presets) in
:mod:`nnunet_mamba.nnunet`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..nnunet.commands import command_environment
from ..nnunet.folders import NnUNetFolders
from ..nnunet.folders import dataset_name as nnunet_dataset_name
from ..nnunet.plans_presets import resolve_preset
from ..nnunet.trainers import check_networks, find_trainer_classes
from .baselines import parse_trainer_specs
from .convert import DEFAULT_NAME, DEFAULT_SEED, N_FOLDS, PAPER_FOLD
from .jobs import EXECUTORS, LocalJobs, SlurmJobs, device_slots, parse_time
from .metrics import CONVENTIONS, METRICS, default_jobs, evaluate_folder, get_convention, write_results
from .provenance import command_line, method_key, protocol_record, versions
from .steps import (CONFIGURATION, PredictionSet, StepLog, plan_and_preprocess, prediction_jobs, prepare_dataset,
                    run_plans_name, trainer_folder, training_jobs, training_plans)
from .table1 import PAPER_TABLE1, write_table1


@dataclass(frozen=True)
class ReproduceOptions:
    """Everything ``nnmamba brats2023 reproduce`` needs (the CLI arguments, validated)."""

    src: Path
    trainers: tuple
    dataset_id: int = 501
    name: str = DEFAULT_NAME
    folds: tuple = (PAPER_FOLD,)
    work: Path | None = None
    out: Path | None = None
    convention: str = "brats2023"
    metrics: str = "both"   # legacy | lesionwise | both (see metrics.evaluate_folder)
    device: str = "cuda"
    gpus: int | None = None
    plans: str = "nnUNetPlans"
    preset: str | None = None
    seed: int = DEFAULT_SEED
    mode: str = "link"
    jobs: int = field(default_factory=default_jobs)   # processes for validation, preprocessing, evaluation;
    #                                                   trainings at once on the CPU
    dry_run: bool = False
    executor: str = "local"          # local | slurm (see jobs.py)
    partition: str | None = None     # Slurm partition (default: the cluster's); slurm only
    gpus_per_job: int | None = None  # GPUs of one Slurm job (None: 1); >1 trains with nnU-Net's -num_gpus
    time: str | None = None          # Slurm time limit of one job: minutes or HH:MM:SS; required with slurm


def option_defaults() -> dict:
    """Each option's default (the command line's defaults come from here)."""
    defaults = {}
    for f in dataclasses.fields(ReproduceOptions):
        if f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
    return defaults


def validate_options(opts: ReproduceOptions) -> None:
    """Cheap checks of the options (no file is written); raises :class:`UserError`."""
    if not opts.trainers:
        raise UserError("no trainer given: pass --trainers, e.g. --trainers nnMambaTrainer nnUNetTrainer")
    if len(set(opts.trainers)) != len(opts.trainers):
        raise UserError(f"--trainers lists a trainer twice: {' '.join(opts.trainers)}")
    parse_trainer_specs(opts.trainers, run_plans_name(opts), opts.preset)
    if not opts.folds:
        raise UserError("no fold given: pass --folds 5 (the paper's split) or --folds 0 1 2 3 4")
    bad = [f for f in opts.folds if not 0 <= f <= PAPER_FOLD]
    if bad:
        raise UserError(f"fold {bad[0]} does not exist: folds 0-{N_FOLDS - 1} are the 5-fold cross-validation "
                        f"over train + val, fold {PAPER_FOLD} the paper's train -> val split")
    if len(set(opts.folds)) != len(opts.folds):
        raise UserError(f"--folds lists a fold twice: {' '.join(map(str, opts.folds))}")
    if PAPER_FOLD in opts.folds and len(opts.folds) > 1:
        raise UserError(f"fold {PAPER_FOLD} (the paper's split, trained on 70% of the cases) cannot be mixed "
                        f"with the cross-validation folds 0-{N_FOLDS - 1} (trained on 80%): pass --folds "
                        f"{PAPER_FOLD} or a subset of --folds {' '.join(map(str, range(N_FOLDS)))}")
    if not 1 <= opts.dataset_id <= 999:
        raise UserError(f"dataset ID must be in 1-999, got {opts.dataset_id}")
    if not opts.name or not all(c.isalnum() or c in "-_" for c in opts.name):
        raise UserError(f"dataset name {opts.name!r} may hold only letters, digits, '-' and '_'")
    if opts.convention not in CONVENTIONS:
        raise UserError(f"unknown --convention {opts.convention!r}; choose from {', '.join(CONVENTIONS)}")
    if opts.metrics not in METRICS:
        raise UserError(f"unknown --metrics {opts.metrics!r}; choose from {', '.join(METRICS)}")
    if opts.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {opts.device!r}")
    if opts.device == "cpu" and opts.gpus not in (None, 1):
        raise UserError(f"--gpus {opts.gpus} needs --device cuda; on the CPU the folds run one after another")
    if opts.gpus is not None and opts.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {opts.gpus}")
    if opts.jobs < 1:
        raise UserError(f"-j must be at least 1, got {opts.jobs}")
    if opts.executor not in EXECUTORS:
        raise UserError(f"unknown --executor {opts.executor!r}; choose from {', '.join(EXECUTORS)}")
    if opts.executor != "slurm":
        given = [flag for flag, value in (("--partition", opts.partition), ("--gpus-per-job", opts.gpus_per_job),
                                          ("--time", opts.time)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} only applies to --executor slurm (this run: --executor "
                            f"{opts.executor}); add --executor slurm or leave {' and '.join(given)} out")
    else:
        if opts.device != "cuda":
            raise UserError("--executor slurm trains on the cluster's GPUs: leave out --device cpu")
        if opts.gpus is not None:
            raise UserError("--gpus counts the GPUs of this machine (--executor local); with --executor slurm "
                            "every fold is its own Slurm job: use --gpus-per-job for the GPUs of one job")
        if opts.time is None:
            raise UserError("--executor slurm needs --time, the time limit of one job (minutes or HH:MM:SS), e.g. "
                            "--time 24:00:00; docs/brats2023.md lists the expected time per fold")
        parse_time(opts.time)
        if opts.gpus_per_job is not None and opts.gpus_per_job < 1:
            raise UserError(f"--gpus-per-job must be at least 1, got {opts.gpus_per_job}")
        if opts.partition is not None and (not opts.partition.strip() or any(c.isspace() for c in opts.partition)):
            raise UserError(f"--partition {opts.partition!r} is not a Slurm partition name")
    if opts.preset is not None:
        resolve_preset(opts.preset)
    if not Path(opts.src).exists():
        raise UserError(f"SRC {opts.src} does not exist: pass the folder holding the BraTS-GLI-XXXXX-XXX case "
                        "folders (the unpacked BraTS 2023 GLI training set)")
    if not Path(opts.src).is_dir():
        raise UserError(f"SRC {opts.src} is not a folder: pass the folder holding the BraTS-GLI-XXXXX-XXX case "
                        "folders")


def describe_slurm(opts: ReproduceOptions) -> str:
    return (f"partition {opts.partition or '(the default)'}, {opts.gpus_per_job or 1} GPU(s) per training job, "
            f"time limit {parse_time(opts.time)} min per job")


def make_executor(opts: ReproduceOptions, folders: NnUNetFolders, out: Path, environ=None):
    """The executor of the run's jobs, the local GPU slots and the commands' environment.

    submitit's files (pickled jobs, results, its logs) go to ``<--work or --out>/submitit``.
    On Slurm no local GPU is needed; each job gets ``nnUNet_n_proc_DA`` (default 12, the
    measured setting) augmentation workers and that many + 2 CPU cores per GPU.
    """
    environ = os.environ if environ is None else environ
    folder = Path(opts.work if opts.work is not None else out).resolve() / "submitit"
    if opts.executor == "slurm":
        env = command_environment(folders, opts.work, "cpu", 1, environ=environ)
        workers = int(env.get("nnUNet_n_proc_DA", "2")) if "nnUNet_n_proc_DA" in environ else 12
        env["nnUNet_n_proc_DA"] = str(workers)
        if "nnUNet_def_n_proc" not in environ:
            env["nnUNet_def_n_proc"] = "8"
        runner = SlurmJobs(env, folder, parse_time(opts.time), opts.partition, cpus_per_gpu=max(1, workers) + 2,
                           environ=environ)
        return runner, [], env
    slots = device_slots(opts.device, opts.gpus, opts.dry_run, cpu_jobs=opts.jobs)
    env = command_environment(folders, opts.work, opts.device, len(slots), environ=environ)
    return LocalJobs(env, slots, folder), slots, env


def reproduce(opts: ReproduceOptions) -> dict | None:
    """Run (or, with ``dry_run``, print) the whole protocol; returns the content of reproduce.json."""
    started = time.time()
    validate_options(opts)
    folders = NnUNetFolders.resolve(opts.work)
    dataset_name = nnunet_dataset_name(opts.dataset_id, opts.name)
    out = Path(opts.out).resolve() if opts.out else folders.results / dataset_name / "reproduce_table1"
    logs = out / "logs"
    runner, slots, env = make_executor(opts, folders, out)
    if opts.executor == "slurm" and not opts.dry_run:
        SlurmJobs.check_cluster()
    log = StepLog()
    print(f"nnmamba brats2023 reproduce: trainers {', '.join(opts.trainers)}; folds "
          f"{' '.join(map(str, opts.folds))}; device {opts.device}"
          + (f" (GPUs {', '.join(slots)})" if opts.device == "cuda" and opts.executor == "local" else "")
          + (f" on Slurm ({describe_slurm(opts)})" if opts.executor == "slurm" else "")
          + f"; output {out}" + (" [dry run: nothing runs, nothing is written]" if opts.dry_run else ""), flush=True)

    # 0. trainers first: an unknown name must fail before hours of work
    t0 = time.time()
    specs = parse_trainer_specs(opts.trainers, run_plans_name(opts), opts.preset)
    classes = find_trainer_classes(list(dict.fromkeys(s.trainer for s in specs)))
    log.add("check trainers", "ran", ", ".join(f"{n} ({c.__module__})" for n, c in classes.items())
            + "".join(f"; {s.given} = {s.trainer} on plans {s.plans}" for s in specs if s.plans), time.time() - t0)

    # 1. dataset, 2. plans and preprocessed data (the run's plans first, then the rows' own plans)
    dataset = prepare_dataset(opts, folders, log)
    uses_run_plans = any(s.plans is None for s in specs)
    fingerprint_ready = None  # look for the fingerprint file
    for source in dict.fromkeys([opts.plans] * uses_run_plans + [s.plans for s in specs if s.plans]):
        plan_and_preprocess(opts, folders, dataset, runner, log, logs, plans=source,
                            fingerprint_ready=fingerprint_ready)
        fingerprint_ready = True if opts.dry_run else None  # a dry run assumes the earlier step ran
    plans_id = training_plans(opts, folders, dataset_name, log, opts.dry_run) if uses_run_plans else opts.plans
    plans_of = {s.given: s.plans_id(plans_id) for s in specs}
    plans_by_id = {}
    for pid in dict.fromkeys(plans_of.values()):
        plans_file = folders.preprocessed / dataset_name / f"{pid}.json"
        if plans_file.is_file():
            plans_by_id[pid] = json.loads(plans_file.read_text())
    if plans_by_id:
        dataset_json = json.loads((folders.preprocessed / dataset_name / "dataset.json").read_text())
        built = []
        for pid, plans in plans_by_id.items():
            users = {s.trainer: classes[s.trainer] for s in specs if plans_of[s.given] == pid}
            check_networks(users, plans, dataset_json)
            conf = plans["configurations"][CONFIGURATION]
            built.append(f"{', '.join(users)} on {pid} (patch {conf['patch_size']}, batch {conf['batch_size']})")
        log.add("check networks", "ran", "every network builds for its plans: " + "; ".join(built))

    # 3. training
    train = training_jobs(opts, folders, dataset_name, plans_id, logs, log)
    if opts.dry_run:
        for job in train:
            log.add(job.name, "planned", ("continue from its checkpoint" if job.resume else "new")
                    + (f"; Slurm job {runner.parameters(job)}" if opts.executor == "slurm" else ""),
                    command=job.shell())
    elif train:
        print(f"training {len(train)} fold(s), " + (f"{len(slots)} at a time" if opts.executor == "local" else
              "one Slurm job each") + f"; submitit's files in {runner.folder}", flush=True)
        runner.run(train)
        for job in train:
            final = trainer_folder(folders, dataset_name, job.trainer, job.plans) / f"fold_{job.fold}"
            if not (final / "checkpoint_final.pth").is_file():
                raise UserError(f"{job.name} finished without {final / 'checkpoint_final.pth'}; see {job.log}")
            log.add(job.name, "ran", ("continued with --c; " if job.resume else "") + f"log {job.log}", job.seconds)

    # 4. prediction of the test set
    images_ts = folders.raw / dataset_name / "imagesTs"
    labels_ts = folders.raw / dataset_name / "labelsTs"
    test_cases = dataset.test_cases if dataset else []
    sets = [PredictionSet(s.trainer, plans_of[s.given], tuple(opts.folds),
                          trainer_folder(folders, dataset_name, s.trainer, plans_of[s.given]),
                          out / "predictions" / method_key(s.key, opts.folds), test_cases, name=s.key) for s in specs]
    predict = prediction_jobs(opts, sets, images_ts, logs, log)
    if opts.dry_run:
        for job in predict:
            log.add(job.name, "planned", f"ensemble of fold(s) {' '.join(map(str, opts.folds))}", command=job.shell())
        log.add("evaluate", "planned", f"Dice and HD95 of WT, TC, ET against {labels_ts} ({opts.convention}); "
                f"write {out / 'table1.md'}, table1.csv, table1_boxplot.png, reproduce.json")
        return None
    if predict:  # submitted now that every training has ended with its checkpoint_final.pth (no dependencies)
        for job in predict:
            (job.prediction.output / PredictionSet.STAMP).unlink(missing_ok=True)
            job.gpus = 1  # nnUNetv2_predict uses one GPU
        runner.run(predict)
        for job in predict:
            job.prediction.write_stamp()
            log.add(job.name, "ran", f"{len(test_cases)} case(s) -> {job.prediction.output}", job.seconds)

    # 5. evaluation and the table
    summaries = {}
    t0 = time.time()
    for spec, ps in zip(specs, sets):  # one table row per --trainers entry, named by its label
        summary = evaluate_folder(ps.output, labels_ts, opts.convention, n_jobs=opts.jobs, metrics=opts.metrics)
        write_results(summary, out / "metrics" / method_key(spec.key, opts.folds))
        summaries[spec.label] = {k: v for k, v in summary.items() if k != "rows"}
    log.add("evaluate", "ran", f"{len(test_cases)} test case(s) x {len(sets)} trainer(s), convention "
            f"{opts.convention}", time.time() - t0)

    confs = {pid: p["configurations"][CONFIGURATION] for pid, p in plans_by_id.items()}
    conf = confs[plans_of[specs[0].given]] if not uses_run_plans else confs[plans_id]
    plans_text = "; ".join(
        f"plans {pid} ({CONFIGURATION}, patch {c['patch_size']}, batch {c['batch_size']})"
        + (f" for {', '.join(s.label for s in specs if plans_of[s.given] == pid)}" if len(confs) > 1 else "")
        for pid, c in confs.items())
    record = dataset.record
    folds_text = (f"fold {PAPER_FOLD} (the paper's split: {len(record['train'])} train -> {len(record['val'])} val)"
                  if opts.folds == (PAPER_FOLD,) else
                  f"ensemble of cross-validation fold(s) {', '.join(map(str, opts.folds))}")
    caption = (f"BraTS 2023 GLI, held-out test split ({len(test_cases)} cases, seed {record['seed']}); "
               f"{folds_text}; {plans_text}; Dice in %, HD95 in mm, mean over test cases; empty masks: "
               f"{get_convention(opts.convention).source}.")
    table = write_table1(out, summaries, caption, f"BraTS 2023 GLI test split ({len(test_cases)} cases), {folds_text}",
                         opts.convention)
    markdown, md_path, csv_path, png_path = table.markdown, table.markdown_file, table.csv_file, table.boxplot_file
    json_path = out / "reproduce.json"
    content = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command_line(opts),
        "protocol": protocol_record(opts, dataset, plans_id if uses_run_plans else plans_of[specs[0].given], conf,
                                    classes, slots, env, specs, confs),
        "versions": versions(opts.device, slots),
        "steps": log.steps,
        "seconds_total": round(time.time() - started, 1),
        "table": {"markdown": markdown, "caption": caption, "rows": [asdict(r) for r in table.rows],
                  "lesionwise_rows": [asdict(r) for r in table.lesion_rows],
                  "paper": {m: {"dice": d, "hd95": h} for m, (d, h) in PAPER_TABLE1.items()}},
        "results": summaries,
        "files": {"markdown": str(md_path), "csv": str(csv_path), "boxplot": str(png_path), "json": str(json_path),
                  "metrics": str(out / "metrics"), "predictions": str(out / "predictions"), "logs": str(logs)},
    }
    json_path.write_text(json.dumps(content, indent=2) + "\n")
    print(f"\n{caption}\n\n{markdown}\n")
    print(f"wrote {md_path}, {csv_path}, {png_path} and {json_path} ({time.time() - started:.0f} s)")
    return content
