"""The steps of ``nnmamba brats2023 reproduce``: dataset, plans and preprocessing, training, prediction.

Each step looks at what exists and decides: ``skipped`` (its output is complete), ``ran`` or,
in a dry run, ``planned`` (with the command it would run); :class:`StepLog` records the
decisions. Training and prediction steps return :class:`~.jobs.Job` lists for an executor
of :mod:`.jobs` (submitit); a :class:`PredictionSet` stamp proves predictions complete and
made from the current checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..nnunet.folders import NnUNetFolders, check_dataset_id_free, environ_set
from ..nnunet.folders import dataset_name as nnunet_dataset_name
from ..nnunet.plans_presets import apply_preset, resolve_preset
from .baselines import PLANNERS, parse_trainer_spec
from .convert import split_cases
from .jobs import Job
from .layout import FILE_ENDING

if TYPE_CHECKING:
    from .jobs import LocalJobs, SlurmJobs
    from .reproduce import ReproduceOptions

CONFIGURATION = "3d_fullres"
_DATA_ENDINGS = (".b2nd", ".npz", ".npy")  # preprocessed case data written by nnU-Net 2.x


@dataclass
class StepLog:
    """What each step did: ``ran``, ``skipped`` or ``planned`` (dry run), with times and commands."""

    steps: list = field(default_factory=list)

    def add(self, name: str, status: str, detail: str = "", seconds: float | None = None, command=None):
        entry = {"step": name, "status": status, "detail": detail}
        if seconds is not None:
            entry["seconds"] = round(seconds, 1)
        if command is not None:
            entry["command"] = command
        self.steps.append(entry)
        text = f"[{status}] {name}" + (f": {detail}" if detail else "")
        if command is not None and status == "planned":
            text += f"\n    $ {command}"
        print(text, flush=True)


@dataclass(frozen=True)
class DatasetState:
    """The converted dataset: its folder, name and split record (``split.json``)."""

    folder: Path
    name: str
    record: dict

    @property
    def train_cases(self) -> list:
        return list(self.record["train"]) + list(self.record["val"])

    @property
    def test_cases(self) -> list:
        return list(self.record["test"])


def prepare_dataset(opts: ReproduceOptions, folders: NnUNetFolders, log: StepLog) -> DatasetState | None:
    """Convert SRC unless the dataset exists with the same split; None in a dry run before conversion."""
    from .convert import convert_brats, find_case_folders

    name = nnunet_dataset_name(opts.dataset_id, opts.name)
    target = folders.raw / name
    case_dirs, problems = find_case_folders(opts.src)
    expected = split_cases([d.name for d in case_dirs], opts.seed)
    if target.exists():
        record_path = target / "split.json"
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{target} exists but has no readable split.json, so it was not written by nnmamba "
                            f"brats2023 convert: choose another -d / --name or remove {target}") from None
        differ = [k for k in ("seed", "train", "val", "test") if record.get(k) != expected.as_dict()[k]]
        if differ:
            raise UserError(f"{target} exists with another split than SRC {opts.src} with --seed {opts.seed} gives "
                            f"({', '.join(differ)} differ; recorded seed {record.get('seed')}, source "
                            f"{record.get('source')}): pass the SRC and --seed it was made from, choose another "
                            f"-d / --name, or remove {target} and its nnUNet_preprocessed / nnUNet_results folders")
        if problems:
            raise UserError(f"SRC {opts.src} holds folders that are not BraTS cases: "
                            + "; ".join(str(p) for p in problems))
        log.add("convert", "skipped", f"{target} exists with the same split (seed {record['seed']}: "
                f"{len(record['train'])} train, {len(record['val'])} val, {len(record['test'])} test)")
        return DatasetState(target, name, record)

    for folder, what in ((folders.raw, "nnUNet_raw"), (folders.preprocessed, "nnUNet_preprocessed"),
                         (folders.results, "nnUNet_results")):
        check_dataset_id_free(folder, opts.dataset_id, name, what)
    if opts.dry_run:
        counts = f"{len(expected.train)} train, {len(expected.val)} val, {len(expected.test)} test"
        log.add("convert", "planned", f"validate {len(case_dirs)} case(s) of {opts.src} and write {target} "
                f"(seed {opts.seed}: {counts}; {opts.mode})",
                command=f"nnmamba brats2023 convert {opts.src} -d {opts.dataset_id} --name {opts.name} "
                        f"--seed {opts.seed} --{opts.mode} -j {opts.jobs}")
        return None
    t0 = time.time()
    with environ_set({"nnUNet_results": folders.results}):  # convert_brats checks it for ID clashes
        result = convert_brats(opts.src, opts.dataset_id, name=opts.name, mode=opts.mode, seed=opts.seed,
                               nnunet_raw=folders.raw, nnunet_preprocessed=folders.preprocessed, overwrite=False,
                               n_jobs=opts.jobs, verbose=True)
    record = json.loads((result.dataset_dir / "split.json").read_text())
    s = result.split
    log.add("convert", "ran", f"wrote {result.dataset_dir} ({result.files}): {len(s.train)} train, {len(s.val)} val, "
            f"{len(s.test)} test (seed {s.seed})", time.time() - t0)
    return DatasetState(result.dataset_dir, name, record)


def preprocessed_missing(folders: NnUNetFolders, dataset_name: str, plans_id: str, cases) -> list:
    """What is missing for training with these plans: the plans file or preprocessed cases."""
    base = folders.preprocessed / dataset_name
    plans_file = base / f"{plans_id}.json"
    if not plans_file.is_file():
        return [str(plans_file)]
    missing = [str(base / "dataset.json")] if not (base / "dataset.json").is_file() else []
    try:
        conf = json.loads(plans_file.read_text())["configurations"][CONFIGURATION]
        data_folder = base / conf["data_identifier"]
    except (ValueError, KeyError):
        return [f"{plans_file} (unreadable or without {CONFIGURATION})"]
    present = set(os.listdir(data_folder)) if data_folder.is_dir() else set()
    for case in cases:
        if f"{case}.pkl" not in present or not any(f"{case}{e}" in present for e in _DATA_ENDINGS):
            missing.append(str(data_folder / case))
    return missing


def plan_and_preprocess(opts, folders, dataset: DatasetState | None, runner: LocalJobs | SlurmJobs, log: StepLog,
                        logs: Path, plans: str | None = None, fingerprint_ready: bool | None = None):
    """Run nnU-Net's planning / preprocessing of 3d_fullres for ``plans`` (default ``--plans``)
    unless its output is complete. The commands run on this machine (``runner.local()``), also
    with ``--executor slurm``.

    Plans of :data:`~.baselines.PLANNERS` that do not exist yet are planned by nnU-Net's own
    planner: ``nnUNetv2_plan_and_preprocess -pl <planner>`` on a new dataset, or, once the
    dataset fingerprint exists (``fingerprint_ready``; default: its file exists),
    ``nnUNetv2_plan_experiment -pl <planner>`` followed by ``nnUNetv2_preprocess`` only if the
    plans' data are missing (nnU-Net's residual-encoder plans reuse ``nnUNetPlans_3d_fullres``).
    """
    plans = plans or opts.plans
    step = "plan_and_preprocess" if plans == opts.plans else f"plan_and_preprocess {plans}"
    log_file = logs / f"{step.replace(' ', '_')}.log"
    name = dataset.name if dataset else nnunet_dataset_name(opts.dataset_id, opts.name)
    cases = dataset.train_cases if dataset else []
    missing = preprocessed_missing(folders, name, plans, cases) if dataset else ["(dataset not converted)"]
    plans_file = folders.preprocessed / name / f"{plans}.json"
    if fingerprint_ready is None:
        fingerprint_ready = (folders.preprocessed / name / "dataset_fingerprint.json").is_file()
    preprocess = ["nnUNetv2_preprocess", "-d", str(opts.dataset_id), "-plans_name", plans,
                  "-c", CONFIGURATION, "-np", str(opts.jobs)]
    if not missing:
        log.add(step, "skipped", f"{plans_file} and the preprocessed data of all {len(cases)} training cases exist")
    else:
        if plans_file.is_file():
            argv = preprocess
        elif plans in PLANNERS and fingerprint_ready:
            argv = ["nnUNetv2_plan_experiment", "-d", str(opts.dataset_id), "-pl", PLANNERS[plans]]
        elif plans in PLANNERS:
            argv = ["nnUNetv2_plan_and_preprocess", "-d", str(opts.dataset_id), "-c", CONFIGURATION,
                    "-pl", PLANNERS[plans], "-np", str(opts.jobs), "-npfp", str(opts.jobs)]
        else:
            raise UserError(f"plans {plans!r} do not exist ({plans_file}) and reproduce plans only "
                            f"{', '.join(PLANNERS)}: plan them yourself (nnUNetv2_plan_and_preprocess -d "
                            f"{opts.dataset_id} -c {CONFIGURATION} -pl <planner> -overwrite_plans_name {plans}) "
                            "and rerun")
        job = Job(step, argv, log_file)
        if opts.dry_run:
            then = f"; then {' '.join(preprocess)} if its data are missing" if argv[0] == "nnUNetv2_plan_experiment" else ""
            log.add(step, "planned", f"{len(missing)} item(s) missing, e.g. {missing[0]}{then}", command=job.shell())
        else:
            env = dict(runner.full_env)
            if env.get("nnUNet_n_proc_DA", "").strip() == "0":  # nnU-Net's planner does set_num_threads(n_proc_DA)
                env["nnUNet_n_proc_DA"] = "1"
            runner.local(env).run([job])
            commands, seconds = [job.shell()], job.seconds
            still = preprocessed_missing(folders, name, plans, cases)
            if still and argv[0] == "nnUNetv2_plan_experiment" and plans_file.is_file():
                job = Job(step, preprocess, log_file)
                runner.local(env).run([job])
                commands.append(job.shell())
                seconds += job.seconds
                still = preprocessed_missing(folders, name, plans, cases)
            if still:
                raise UserError(f"{job.argv[0]} finished but {len(still)} item(s) are missing, e.g. {still[0]}; "
                                f"see {job.log}")
            log.add(step, "ran", "; ".join(commands), seconds)
    if dataset is not None:
        ensure_splits(folders, dataset, opts.dry_run)


def ensure_splits(folders: NnUNetFolders, dataset: DatasetState, dry_run: bool) -> None:
    """The preprocessed ``splits_final.json`` must be the converted one (else fold 5 would be random)."""
    raw_splits = dataset.folder / "splits_final.json"
    pre_splits = folders.preprocessed / dataset.name / "splits_final.json"
    wanted = json.loads(raw_splits.read_text())
    if pre_splits.is_file():
        try:
            have = json.loads(pre_splits.read_text())
        except ValueError:
            have = None
        if have != wanted:
            raise UserError(f"{pre_splits} differs from {raw_splits}: nnU-Net would train other folds than the "
                            f"protocol's. Copy {raw_splits} over it (and retrain any fold trained on it)")
    elif not dry_run:
        pre_splits.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw_splits, pre_splits)


def run_plans_name(opts) -> str:
    """The plans identifier of the entries without their own plans: ``--plans`` or its preset's."""
    if opts.preset is None:
        return opts.plans
    return f"{opts.plans}_{resolve_preset(opts.preset)[1]['plans_suffix']}"


def training_plans(opts, folders, dataset_name: str, log: StepLog, dry_run: bool) -> str:
    """The plans identifier to train with: ``--plans``, or the preset's plans derived from it."""
    if opts.preset is None:
        return opts.plans
    preset_name, preset = resolve_preset(opts.preset)
    if preset["configuration"] != CONFIGURATION:
        raise UserError(f"preset {preset_name} changes {preset['configuration']!r}; reproduce trains {CONFIGURATION}")
    target_id = f"{opts.plans}_{preset['plans_suffix']}"
    base = folders.preprocessed / dataset_name
    source = base / f"{opts.plans}.json"
    if not source.is_file():
        if not dry_run:
            raise UserError(f"{source} is missing after preprocessing")
        log.add("plans preset", "planned", f"apply preset {preset_name} to {opts.plans} -> {target_id}",
                command=f"nnmamba plans apply {opts.preset} -d {opts.dataset_id} --source {opts.plans}")
        return target_id
    new, notes = apply_preset(json.loads(source.read_text()), preset)
    target = base / f"{new['plans_name']}.json"
    if target.is_file():
        try:
            same = json.loads(target.read_text()) == json.loads(json.dumps(new))
        except ValueError:
            same = False
        if not same:
            raise UserError(f"{target} exists but differs from preset {preset_name} applied to {source} (edited by "
                            f"hand, or the plans changed): remove {target} to regenerate it (and retrain models "
                            "trained on it), or use another --preset")
        log.add("plans preset", "skipped", f"{target} exists and matches preset {preset_name}")
    elif dry_run:
        log.add("plans preset", "planned", f"write {target} from preset {preset_name}",
                command=f"nnmamba plans apply {opts.preset} -d {opts.dataset_id} --source {opts.plans}")
    else:
        target.write_text(json.dumps(new, indent=2))
        conf = new["configurations"][CONFIGURATION]
        log.add("plans preset", "ran", f"wrote {target}: patch {conf['patch_size']}, batch {conf['batch_size']}"
                + ("; " + "; ".join(notes) if notes else ""))
    return new["plans_name"]


def trainer_folder(folders: NnUNetFolders, dataset_name: str, trainer: str, plans_id: str) -> Path:
    return folders.results / dataset_name / f"{trainer}__{plans_id}__{CONFIGURATION}"


def training_jobs(opts, folders, dataset_name: str, plans_id: str, logs: Path, log: StepLog) -> list:
    """``nnUNetv2_train`` jobs for the folds not finished yet (with ``--c`` where a checkpoint exists).

    ``plans_id`` is the run's plans (``--plans`` after the preset); entries that name their own
    plans (:mod:`.baselines`) train on those.
    """
    jobs = []
    for spec in map(parse_trainer_spec, opts.trainers):
        plans = spec.plans_id(plans_id)
        for fold in opts.folds:
            out = trainer_folder(folders, dataset_name, spec.trainer, plans) / f"fold_{fold}"
            name = f"train {spec.given} fold {fold}"
            if (out / "checkpoint_final.pth").is_file():
                log.add(name, "skipped", f"{out / 'checkpoint_final.pth'} exists")
                continue
            argv = ["nnUNetv2_train", str(opts.dataset_id), CONFIGURATION, str(fold), "-tr", spec.trainer,
                    "-p", plans, "-device", opts.device]
            gpus = getattr(opts, "gpus_per_job", None) or 1
            if gpus > 1:
                argv += ["-num_gpus", str(gpus)]  # nnU-Net's DDP in one Slurm job (not measured here)
            resume = any((out / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_best.pth"))
            if resume:
                argv.append("--c")
            jobs.append(Job(name, argv, logs / f"train_{spec.key}_fold{fold}.log", trainer=spec.trainer, fold=fold,
                            resume=resume, plans=plans, fold_folder=out, gpus=gpus))
    return jobs


def _checkpoint_stamp(path: Path) -> dict:
    st = path.stat()
    return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class PredictionSet:
    """Test-set predictions of one trainer from its trained folds, and the stamp proving them complete."""

    trainer: str
    plans_id: str
    folds: tuple
    model_folder: Path
    output: Path
    test_cases: list
    name: str | None = None   # the row's key (job and log names); default: the trainer

    STAMP = "reproduce_prediction.json"

    def expected_stamp(self) -> dict:
        return {"trainer": self.trainer, "plans": self.plans_id, "configuration": CONFIGURATION,
                "folds": list(self.folds), "cases": sorted(self.test_cases),
                "checkpoints": [_checkpoint_stamp(self.model_folder / f"fold_{f}" / "checkpoint_final.pth")
                                for f in self.folds]}

    def is_complete(self) -> bool:
        stamp = self.output / self.STAMP
        if not stamp.is_file():
            return False
        try:
            if json.loads(stamp.read_text()) != self.expected_stamp():
                return False
        except (ValueError, OSError):  # unreadable stamp, or a checkpoint is missing
            return False
        return all((self.output / f"{c}{FILE_ENDING}").is_file() for c in self.test_cases)

    def write_stamp(self) -> None:
        missing = [c for c in self.test_cases if not (self.output / f"{c}{FILE_ENDING}").is_file()]
        if missing:
            raise UserError(f"nnUNetv2_predict finished but {len(missing)} prediction(s) are missing in "
                            f"{self.output}, e.g. {missing[0]}{FILE_ENDING}")
        (self.output / self.STAMP).write_text(json.dumps(self.expected_stamp(), indent=2) + "\n")


def prediction_jobs(opts, sets: list, images_ts: Path, logs: Path, log: StepLog) -> list:
    jobs = []
    for ps in sets:
        name = f"predict {ps.name or ps.trainer} folds {' '.join(map(str, ps.folds))}"
        if ps.is_complete():
            log.add(name, "skipped", f"{len(ps.test_cases)} predictions in {ps.output} are complete and made from "
                    "the current checkpoints")
            continue
        argv = ["nnUNetv2_predict", "-i", str(images_ts), "-o", str(ps.output), "-d", str(opts.dataset_id),
                "-c", CONFIGURATION, "-p", ps.plans_id, "-tr", ps.trainer, "-f", *map(str, ps.folds),
                "-device", opts.device]
        if opts.device == "cpu":
            argv += ["-npp", "1", "-nps", "1"]
        jobs.append(Job(name, argv, logs / f"predict_{ps.name or ps.trainer}.log", trainer=ps.trainer, prediction=ps,
                        plans=ps.plans_id))
    return jobs
