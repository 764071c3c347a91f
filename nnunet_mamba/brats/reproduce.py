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
   :func:`nnunet_mamba.plans_presets.apply_preset`. Rows on their own plans (``TRAINER:PLANS``,
   or nnU-Net's residual-encoder baselines ``nnUNetTrainer_ResEncM`` / ``_ResEncL``, see
   :mod:`.baselines`) get those plans from nnU-Net's own planner (``nnUNetv2_plan_experiment
   -pl nnUNetPlannerResEncM`` once the fingerprint exists; the 3d_fullres data are shared) and
   train on them as planned, on the same split.
3. **Train** the chosen folds of every trainer with ``nnUNetv2_train``: a fold with
   ``checkpoint_final.pth`` is skipped, one with ``checkpoint_latest.pth`` (or ``_best``) is
   continued with ``--c``. With several GPUs, one fold per GPU runs at a time
   (``CUDA_VISIBLE_DEVICES`` per process); on one GPU or the CPU the folds run one by one.
4. **Predict** the held-out test cases (``imagesTs``) with ``nnUNetv2_predict -f <folds>``
   (nnU-Net averages the folds' logits: an ensemble when several folds are given); skipped
   when a stamp file shows that complete predictions were made from the same checkpoints.
5. **Evaluate** with :func:`~.metrics.evaluate_folder` against ``labelsTs`` and write the
   table in the layout of the paper's Table 1 (Markdown and CSV), a box plot of the per-case
   Dice and HD95 (PNG), and ``reproduce.json`` with every number and the protocol.

Unknown trainers, a network that cannot be built for the plans (e.g. UNETR with a patch not
divisible by 16), missing folders and bad options are reported before any long step runs.
``--dry-run`` prints the plan of commands without running or writing anything.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import difflib
import importlib.metadata
import io
import json
import os
import platform
import queue
import shutil
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from .baselines import PLANNERS, parse_trainer_spec, parse_trainer_specs
from .convert import DEFAULT_SEED, N_FOLDS, PAPER_FOLD, PAPER_FRACTIONS, _check_dataset_id_free, split_cases
from .layout import CHANNEL_ORDER, FILE_ENDING, REGIONS, REGIONS_CLASS_ORDER

CONFIGURATION = "3d_fullres"


#: The numbers reported in the paper's Table 1 (Gong et al. 2024, BraTS 2023 GLI test split):
#: method -> (Dice WT, TC, ET, Average in %), (HD95 WT, TC, ET, Average in mm). Printed next to
#: the measured table for comparison only; never mixed into measured results.
PAPER_TABLE1 = {
    "ViT": ((92.97, 88.88, 84.30, 88.72), (5.20, 6.06, 12.83, 8.03)),
    "DIT": ((93.49, 90.22, 84.38, 89.36), (4.21, 5.27, 13.64, 7.71)),
    "UNETR": ((93.33, 89.89, 85.19, 89.47), (4.76, 7.27, 12.78, 8.27)),
    "nnUNet": ((93.31, 90.24, 85.18, 89.58), (4.49, 4.95, 11.91, 7.12)),
    "nnMamba": ((93.70, 90.67, 85.65, 90.01), (3.88, 6.82, 11.59, 7.43)),
}

TABLE_REGIONS = tuple(REGIONS)  # WT, TC, ET
_DATA_ENDINGS = (".b2nd", ".npz", ".npy")  # preprocessed case data written by nnU-Net 2.x


# ============================================================================ options

@dataclass(frozen=True)
class ReproduceOptions:
    """Everything ``nnmamba brats2023 reproduce`` needs (the CLI arguments, validated)."""

    src: Path
    trainers: tuple
    dataset_id: int = 501
    name: str = "BraTS2023GLI"
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
    jobs: int = 2
    dry_run: bool = False


def validate_options(opts: ReproduceOptions) -> None:
    """Cheap checks of the options (no file is written); raises :class:`UserError`."""
    from .metrics import CONVENTIONS

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
    if opts.metrics not in ("legacy", "lesionwise", "both"):
        raise UserError(f"unknown --metrics {opts.metrics!r}; choose from legacy, lesionwise, both")
    if opts.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {opts.device!r}")
    if opts.device == "cpu" and opts.gpus not in (None, 1):
        raise UserError(f"--gpus {opts.gpus} needs --device cuda; on the CPU the folds run one after another")
    if opts.gpus is not None and opts.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {opts.gpus}")
    if opts.jobs < 1:
        raise UserError(f"-j must be at least 1, got {opts.jobs}")
    if opts.preset is not None:
        resolve_preset(opts.preset)
    if not Path(opts.src).exists():
        raise UserError(f"SRC {opts.src} does not exist: pass the folder holding the BraTS-GLI-XXXXX-XXX case "
                        "folders (the unpacked BraTS 2023 GLI training set)")
    if not Path(opts.src).is_dir():
        raise UserError(f"SRC {opts.src} is not a folder: pass the folder holding the BraTS-GLI-XXXXX-XXX case "
                        "folders")


# ============================================================================ folders and environment

@dataclass(frozen=True)
class NnUNetFolders:
    """nnU-Net's three folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``)."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def resolve(cls, work: Path | None, environ=os.environ) -> "NnUNetFolders":
        if work is not None:
            work = Path(work).resolve()
            return cls(work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results")
        missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not environ.get(v)]
        if missing:
            raise UserError(f"{', '.join(missing)} not set: export nnU-Net's folders (nnUNet_raw, "
                            "nnUNet_preprocessed, nnUNet_results) or pass --work DIR to keep everything in DIR")
        return cls(*(Path(environ[v]).resolve() for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")))


def command_environment(folders: NnUNetFolders, work: Path | None, device: str, parallel: int,
                        environ=os.environ) -> dict:
    """Environment of the nnU-Net commands.

    ``nnUNet_*`` folders from ``folders``; ``nnUNet_compile`` false unless set by the user
    (the Mamba trainers' selective scan is not meant to be traced). Data-augmentation workers
    (``nnUNet_n_proc_DA``), unless set by the user: 2 on the CPU, on CUDA the CPU cores shared
    by the ``parallel`` trainings (2-12 each).
    """
    from ..demo import nnunet_env

    env = nnunet_env(Path(work).resolve()) if work is not None else dict(environ)
    if work is None:
        env.setdefault("nnUNet_n_proc_DA", "2")
        env.setdefault("nnUNet_def_n_proc", "2")
        env.setdefault("nnUNet_compile", "false")
    env.update({"nnUNet_raw": str(folders.raw), "nnUNet_preprocessed": str(folders.preprocessed),
                "nnUNet_results": str(folders.results)})
    for key in ("nnUNet_compile", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        if key in environ:
            env[key] = environ[key]
    if device == "cuda":
        cores = os.cpu_count() or 2
        if "nnUNet_n_proc_DA" not in environ:
            env["nnUNet_n_proc_DA"] = str(max(2, min(12, cores // max(1, parallel))))
        if "nnUNet_def_n_proc" not in environ:
            env["nnUNet_def_n_proc"] = str(max(2, min(8, cores // max(1, parallel))))
    return env


def device_slots(device: str, gpus: int | None, dry_run: bool = False, environ=os.environ) -> list:
    """GPU ids for ``CUDA_VISIBLE_DEVICES`` of the concurrent processes (``[None]`` on the CPU).

    On CUDA the ids are those visible to this process (``CUDA_VISIBLE_DEVICES`` if set);
    ``gpus`` (default: all of them) of them are used, one training at a time on each.
    """
    if device == "cpu":
        return [None]
    import torch

    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if dry_run:
            return [str(i) for i in range(gpus or 1)]
        raise UserError("--device cuda but no CUDA GPU is visible to PyTorch: run on a GPU machine (check "
                        "nvidia-smi and CUDA_VISIBLE_DEVICES) or pass --device cpu (slow; for tests only)")
    ids = (ids or [str(i) for i in range(count)])[:count]
    n = len(ids) if gpus is None else gpus
    if n > len(ids):
        raise UserError(f"--gpus {n} but only {len(ids)} GPU(s) are visible ({', '.join(ids)}); pass --gpus "
                        f"{len(ids)} or fewer")
    return ids[:n]


# ============================================================================ trainers

def _known_trainer_names() -> list[str]:
    """Names of trainer classes loaded so far (nnU-Net's own) plus ours (for suggestions)."""
    import inspect
    import pkgutil

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    names = set()
    modules = [m for k, m in list(sys.modules.items()) if k.startswith("nnunetv2.training.nnUNetTrainer")]
    try:
        import nnunet_mamba_trainers

        for info in pkgutil.iter_modules(nnunet_mamba_trainers.__path__):
            with contextlib.suppress(Exception):
                modules.append(__import__(f"nnunet_mamba_trainers.{info.name}", fromlist=["_"]))
    except ImportError:
        pass
    for module in modules:
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and not obj.__name__.startswith("_"):
                names.add(obj.__name__)
    return sorted(names)


def find_trainer_classes(names) -> dict:
    """Look every trainer up the way ``nnUNetv2_train`` does; unknown names are one UserError."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    found, unknown = {}, []
    for name in names:
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecations inside modules it imports
                found[name] = recursive_find_trainer_class_by_name(name)
        except (RuntimeError, AssertionError):
            unknown.append(name)
    if unknown:
        known = _known_trainer_names()
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hints.append(f"{name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UserError(f"unknown trainer(s): {'; '.join(hints)}. nnU-Net found no such class in "
                        "nnunetv2/training/nnUNetTrainer nor in the folders of $nnUNet_extTrainer "
                        f"({os.environ.get('nnUNet_extTrainer', 'unset')}). Fix the name (ours: nnMambaTrainer, "
                        "UNETRTrainer, ...; nnU-Net's: nnUNetTrainer; short variants end in _1epoch, _5epochs, "
                        "_smoke) or install the package that defines it")
    return found


def check_networks(trainer_classes: dict, plans: dict, dataset_json: dict, configuration: str = CONFIGURATION):
    """Build each trainer's network for these plans (on PyTorch's meta device: shapes only).

    Catches what would otherwise fail minutes into a training, e.g. UNETR with a patch size
    not divisible by 16. A network that cannot be built on the meta device is built on the CPU.
    """
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    conf = manager.get_configuration(configuration)
    n_in = determine_num_input_channels(manager, conf, dataset_json)
    n_out = manager.get_label_manager(dataset_json).num_segmentation_heads
    for name, cls in trainer_classes.items():
        try:
            with torch.device("meta"):
                cls.build_network_architecture(manager, conf, n_in, n_out, True)
            continue
        except Exception:
            pass
        try:
            cls.build_network_architecture(manager, conf, n_in, n_out, True)
        except Exception as e:
            raise UserError(f"trainer {name} cannot build its network for plans {plans.get('plans_name')!r} "
                            f"({configuration}, patch {conf.patch_size}): {type(e).__name__}: {e}") from None


# ============================================================================ commands

@dataclass
class Job:
    """One nnU-Net command: its argv (console-script name first), log file and what it is."""

    name: str
    argv: list
    log: Path
    trainer: str | None = None
    fold: int | None = None
    resume: bool = False                   # a training continued with --c
    prediction: "PredictionSet | None" = None
    plans: str | None = None               # the plans identifier a training uses
    seconds: float | None = None
    slot: str | None = None
    error: str | None = None

    def shell(self) -> str:
        return " ".join(str(a) for a in self.argv)


class JobRunner:
    """Runs jobs with at most one per device slot at a time.

    ``slots`` are GPU ids (each job gets ``CUDA_VISIBLE_DEVICES=<id>``) or ``[None]`` (one job
    at a time, environment unchanged). Failures do not stop the other jobs; they are raised
    together at the end as one :class:`UserError` naming each log file.
    """

    def __init__(self, env: dict, slots: list):
        self.env = env
        self.slots = list(slots)

    def _run_one(self, job: Job, slot) -> None:
        from ..demo import run_command

        env = dict(self.env)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        job.slot = slot
        where = f" on GPU {slot}" if slot is not None else ""
        print(f"[{job.name}]{where}: log {job.log}", flush=True)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        try:
            with open(job.log, "a") as log:
                log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} "
                          f"CUDA_VISIBLE_DEVICES={slot}\n$ {job.shell()}\n")
                log.flush()
                run_command([str(a) for a in job.argv], env, log)
        except UserError as e:
            job.error = str(e)
        except OSError as e:
            job.error = f"could not run {job.argv[0]}: {e} (log: {job.log})"
        job.seconds = time.time() - t0

    def run(self, jobs: list) -> None:
        if len(self.slots) == 1 or len(jobs) <= 1:
            for job in jobs:
                self._run_one(job, self.slots[0])
        else:
            free = queue.Queue()
            for s in self.slots:
                free.put(s)

            def worker(job):
                slot = free.get()
                try:
                    self._run_one(job, slot)
                finally:
                    free.put(slot)

            threads = [threading.Thread(target=worker, args=(j,), daemon=True) for j in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        failed = [j for j in jobs if j.error]
        if failed:
            raise UserError(f"{len(failed)} of {len(jobs)} command(s) failed; the others finished (rerun the same "
                            "command to resume):\n  " +
                            "\n  ".join(f"{j.name}: {j.error}" for j in failed))


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


# ============================================================================ dataset, plans, preprocessing

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


@contextlib.contextmanager
def _results_env(results: Path):
    """``convert_brats`` checks ``$nnUNet_results`` for ID clashes: point it at ours meanwhile."""
    old = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = str(results)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = old


def prepare_dataset(opts: ReproduceOptions, folders: NnUNetFolders, log: StepLog) -> DatasetState | None:
    """Convert SRC unless the dataset exists with the same split; None in a dry run before conversion."""
    from .convert import convert_brats, find_case_folders

    name = f"Dataset{opts.dataset_id:03d}_{opts.name}"
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
        _check_dataset_id_free(folder, opts.dataset_id, name, what)
    if opts.dry_run:
        counts = f"{len(expected.train)} train, {len(expected.val)} val, {len(expected.test)} test"
        log.add("convert", "planned", f"validate {len(case_dirs)} case(s) of {opts.src} and write {target} "
                f"(seed {opts.seed}: {counts}; {opts.mode})",
                command=f"nnmamba brats2023 convert {opts.src} -d {opts.dataset_id} --name {opts.name} "
                        f"--seed {opts.seed} --{opts.mode} -j {opts.jobs}")
        return None
    t0 = time.time()
    with _results_env(folders.results):
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


def plan_and_preprocess(opts, folders, dataset: DatasetState | None, runner: JobRunner, log: StepLog, logs: Path,
                        plans: str | None = None, fingerprint_ready: bool | None = None):
    """Run nnU-Net's planning / preprocessing of 3d_fullres for ``plans`` (default ``--plans``)
    unless its output is complete.

    Plans of :data:`~.baselines.PLANNERS` that do not exist yet are planned by nnU-Net's own
    planner: ``nnUNetv2_plan_and_preprocess -pl <planner>`` on a new dataset, or, once the
    dataset fingerprint exists (``fingerprint_ready``; default: its file exists),
    ``nnUNetv2_plan_experiment -pl <planner>`` followed by ``nnUNetv2_preprocess`` only if the
    plans' data are missing (nnU-Net's residual-encoder plans reuse ``nnUNetPlans_3d_fullres``).
    """
    plans = plans or opts.plans
    step = "plan_and_preprocess" if plans == opts.plans else f"plan_and_preprocess {plans}"
    log_file = logs / f"{step.replace(' ', '_')}.log"
    name = dataset.name if dataset else f"Dataset{opts.dataset_id:03d}_{opts.name}"
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
            env = dict(runner.env)
            if env.get("nnUNet_n_proc_DA", "").strip() == "0":  # nnU-Net's planner does set_num_threads(n_proc_DA)
                env["nnUNet_n_proc_DA"] = "1"
            JobRunner(env, [None]).run([job])
            commands, seconds = [job.shell()], job.seconds
            still = preprocessed_missing(folders, name, plans, cases)
            if still and argv[0] == "nnUNetv2_plan_experiment" and plans_file.is_file():
                job = Job(step, preprocess, log_file)
                JobRunner(env, [None]).run([job])
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


def resolve_preset(value: str) -> tuple[str, dict]:
    """A preset by name (``nnmamba plans list``) or from a JSON file with the same keys."""
    from ..plans_presets import available_presets

    presets = available_presets()
    if value in presets:
        return value, presets[value]
    path = Path(value)
    if path.suffix == ".json" and path.is_file():
        try:
            preset = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"preset file {path} is not valid JSON ({e})") from None
        needed = ("configuration", "patch_size", "batch_size", "plans_suffix")
        lacking = [k for k in needed if k not in preset]
        if lacking:
            raise UserError(f"preset file {path} lacks {', '.join(lacking)}; a preset holds {', '.join(needed)} "
                            f"(see nnunet_mamba_plans/paper.json)")
        return str(path.resolve()), preset
    raise UserError(f"unknown --preset {value!r}: use one of {', '.join(sorted(presets))} or a preset .json file")


def run_plans_name(opts) -> str:
    """The plans identifier of the entries without their own plans: ``--plans`` or its preset's."""
    if opts.preset is None:
        return opts.plans
    return f"{opts.plans}_{resolve_preset(opts.preset)[1]['plans_suffix']}"


def training_plans(opts, folders, dataset_name: str, log: StepLog, dry_run: bool) -> str:
    """The plans identifier to train with: ``--plans``, or the preset's plans derived from it."""
    from ..plans_presets import apply_preset

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


# ============================================================================ training, prediction

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
            resume = any((out / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_best.pth"))
            if resume:
                argv.append("--c")
            jobs.append(Job(name, argv, logs / f"train_{spec.key}_fold{fold}.log", trainer=spec.trainer, fold=fold,
                            resume=resume, plans=plans))
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


# ============================================================================ table, CSV, plot

@dataclass(frozen=True)
class Table1Row:
    """One row of the paper's Table 1: Dice (%) and HD95 (mm) for WT, TC, ET and their average."""

    method: str
    dice: tuple       # (WT, TC, ET, Average) in %
    hd95: tuple       # (WT, TC, ET, Average) in mm
    dice_std: tuple = ()   # (WT, TC, ET) population std over cases, in %
    hd95_std: tuple = ()   # (WT, TC, ET) in mm
    n_cases: int | None = None

    @classmethod
    def from_summary(cls, method: str, summary: dict) -> "Table1Row":
        """From :func:`~.metrics.evaluate_folder`'s summary (Dice as fractions there)."""
        regions = summary["regions"]
        dice = tuple(100.0 * regions[r]["dice"]["mean"] for r in TABLE_REGIONS)
        hd95 = tuple(regions[r]["hd95"]["mean"] for r in TABLE_REGIONS)
        return cls(method, dice + (100.0 * summary["average"]["dice"],), hd95 + (summary["average"]["hd95"],),
                   tuple(100.0 * regions[r]["dice"]["std"] for r in TABLE_REGIONS),
                   tuple(regions[r]["hd95"]["std"] for r in TABLE_REGIONS), summary["n_cases"])


TABLE1_HEADER = ["Method"] + [f"Dice {r}" for r in (*TABLE_REGIONS, "Average")] + \
                [f"HD95 {r}" for r in (*TABLE_REGIONS, "Average")]


def format_table1_markdown(rows) -> str:
    """Markdown table in the layout of the paper's Table 1 (values to 2 decimals)."""
    lines = ["| " + " | ".join(TABLE1_HEADER) + " |",
             "|" + "---|" + "---:|" * (len(TABLE1_HEADER) - 1)]
    for row in rows:
        cells = [row.method] + [f"{v:.2f}" for v in (*row.dice, *row.hd95)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table1_csv(rows, path: Path) -> Path:
    """CSV with one row per method: means, then the per-region std, then the number of cases."""
    names = [f"dice_{r}" for r in (*TABLE_REGIONS, "Average")] + [f"hd95_{r}" for r in (*TABLE_REGIONS, "Average")]
    std_names = [f"dice_{r}_std" for r in TABLE_REGIONS] + [f"hd95_{r}_std" for r in TABLE_REGIONS]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *names, *std_names, "n_cases"])
        for row in rows:
            writer.writerow([row.method, *(f"{v:.4f}" for v in (*row.dice, *row.hd95)),
                             *(f"{v:.4f}" for v in (*row.dice_std, *row.hd95_std)), row.n_cases])
    return path


def paper_rows() -> list:
    return [Table1Row(m, d, h) for m, (d, h) in PAPER_TABLE1.items()]


def plot_per_case(summaries: dict, path: Path, title: str = "") -> Path:
    """Box plots of the per-case Dice (%) and HD95 (mm): one panel per metric and region, one box per method."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(summaries)
    fig = Figure(figsize=(4.2 * len(TABLE_REGIONS), 7.5))
    FigureCanvasAgg(fig)  # the Agg (file-only) backend, without touching pyplot's global state
    axes = fig.subplots(2, len(TABLE_REGIONS), squeeze=False)
    for row, (metric, unit, scale) in enumerate((("dice", "Dice (%)", 100.0), ("hd95", "HD95 (mm)", 1.0))):
        for col, region in enumerate(TABLE_REGIONS):
            ax = axes[row][col]
            data = [[scale * case[region][metric] for case in summaries[m]["per_case"].values()] for m in methods]
            ax.boxplot(data, showmeans=True, showfliers=False)
            for i, values in enumerate(data, start=1):  # every case as a dot (few cases, outliers)
                jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
                ax.scatter(i + jitter, values, s=6, alpha=0.5, color="tab:blue", zorder=3)
            ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{region} {unit}")
            ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# ============================================================================ provenance

def versions(device: str, slots) -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("nnunet-mamba", "nnunetv2", "torch", "dynamic-network-architectures", "monai", "numpy",
                 "SimpleITK", "mamba-ssm", "causal-conv1d"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import torch

    out["torch_cuda"] = torch.version.cuda
    if device == "cuda" and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def command_line(opts: ReproduceOptions) -> str:
    """The ``nnmamba brats2023 reproduce`` command that gives these options."""
    parts = ["nnmamba", "brats2023", "reproduce", str(Path(opts.src).resolve()), "--trainers", *opts.trainers,
             "-d", str(opts.dataset_id), "--name", opts.name, "--folds", *map(str, opts.folds),
             "--convention", opts.convention, "--metrics", opts.metrics, "--device", opts.device, "--plans", opts.plans,
             "--seed", str(opts.seed), f"--{opts.mode}", "-j", str(opts.jobs)]
    if opts.work is not None:
        parts += ["--work", str(Path(opts.work).resolve())]
    if opts.out is not None:
        parts += ["--out", str(Path(opts.out).resolve())]
    if opts.gpus is not None:
        parts += ["--gpus", str(opts.gpus)]
    if opts.preset is not None:
        parts += ["--preset", opts.preset]
    return " ".join(parts)


def protocol_record(opts: ReproduceOptions, dataset: DatasetState, plans_id: str, conf: dict, classes: dict,
                    slots, env: dict, specs=(), plans_by_id=None) -> dict:
    """The protocol as run: data, split, folds, plans, trainers, inference, metrics (for reproduce.json)."""
    from .lesionwise import RULES as LESIONWISE_RULES
    from .metrics import get_convention, hd95_library

    record = dataset.record
    return {
        "paper": "Gong et al. 2024, nnMamba, Sec. 3.2 and Table 1 (BraTS 2023 GLI, 7:1:2 split, nnU-Net)",
        "source": str(Path(opts.src).resolve()),
        "dataset": {"id": opts.dataset_id, "name": dataset.name, "raw": str(dataset.folder)},
        "split": {"seed": record["seed"], "fractions": record.get("fractions", PAPER_FRACTIONS),
                  "counts": {k: len(record[k]) for k in ("train", "val", "test")},
                  "method": record.get("method"), "test_cases": dataset.test_cases},
        "channels": {f"_{i:04d}": m for i, m in enumerate(CHANNEL_ORDER)},
        "regions": {r: list(v) for r, v in REGIONS.items()},
        "regions_class_order": list(REGIONS_CLASS_ORDER),
        "folds": list(opts.folds),
        "folds_meaning": (f"splits_final.json: folds 0-{N_FOLDS - 1} 5-fold CV over train + val; fold "
                          f"{PAPER_FOLD} the paper's train -> val split"),
        "configuration": CONFIGURATION,
        "plans": {"source": opts.plans, "preset": opts.preset, "identifier": plans_id,
                  "patch_size": conf["patch_size"], "batch_size": conf["batch_size"], "spacing": conf["spacing"]},
        "trainers": ({s.given: {"class": f"{classes[s.trainer].__module__}.{s.trainer}", "plans": s.plans_id(plans_id),
                                "row": s.label} for s in specs} if specs else
                     {n: f"{c.__module__}.{c.__name__}" for n, c in classes.items()}),
        "plans_per_row": {p: {k: c[k] for k in ("patch_size", "batch_size", "spacing")}
                          for p, c in (plans_by_id or {}).items()},
        "device": opts.device, "parallel_gpus": list(slots) if opts.device == "cuda" else [],
        "inference": ("nnUNetv2_predict -f <folds>: sliding window (step 0.5, Gaussian weighting), mirroring "
                      "test-time augmentation, logits averaged over the folds, sigmoid > 0.5 per region, painted "
                      f"in regions_class_order {list(REGIONS_CLASS_ORDER)}"),
        "metrics": {"blocks": opts.metrics, "lesionwise": LESIONWISE_RULES if opts.metrics != "legacy" else None,
                    "convention": asdict(get_convention(opts.convention)), "hd95": hd95_library(opts.convention),
                    "dice": "2|P&R| / (|P|+|R|) on the region masks",
                    "table": "per region: mean over test cases; Average: mean over WT, TC, ET"},
        "environment": {k: env.get(k) for k in ("nnUNet_compile", "nnUNet_n_proc_DA", "nnUNet_def_n_proc")},
    }


def _method_key(trainer: str, folds) -> str:
    return f"{trainer}__folds_{'_'.join(map(str, folds))}"


# ============================================================================ the command

def reproduce(opts: ReproduceOptions) -> dict | None:
    """Run (or, with ``dry_run``, print) the whole protocol; returns the content of reproduce.json."""
    started = time.time()
    validate_options(opts)
    folders = NnUNetFolders.resolve(opts.work)
    slots = device_slots(opts.device, opts.gpus, opts.dry_run)
    env = command_environment(folders, opts.work, opts.device, len(slots))
    dataset_name = f"Dataset{opts.dataset_id:03d}_{opts.name}"
    out = Path(opts.out).resolve() if opts.out else folders.results / dataset_name / "reproduce_table1"
    logs = out / "logs"
    log = StepLog()
    print(f"nnmamba brats2023 reproduce: trainers {', '.join(opts.trainers)}; folds "
          f"{' '.join(map(str, opts.folds))}; device {opts.device}"
          + (f" (GPUs {', '.join(slots)})" if opts.device == "cuda" else "")
          + f"; output {out}" + (" [dry run: nothing runs, nothing is written]" if opts.dry_run else ""), flush=True)

    # 0. trainers first: an unknown name must fail before hours of work
    t0 = time.time()
    specs = parse_trainer_specs(opts.trainers, run_plans_name(opts), opts.preset)
    classes = find_trainer_classes(list(dict.fromkeys(s.trainer for s in specs)))
    log.add("check trainers", "ran", ", ".join(f"{n} ({c.__module__})" for n, c in classes.items())
            + "".join(f"; {s.given} = {s.trainer} on plans {s.plans}" for s in specs if s.plans), time.time() - t0)

    # 1. dataset, 2. plans and preprocessed data (the run's plans first, then the rows' own plans)
    dataset = prepare_dataset(opts, folders, log)
    runner = JobRunner(env, slots)
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
            log.add(job.name, "planned", "continue from its checkpoint" if job.resume else "new", command=job.shell())
    elif train:
        print(f"training {len(train)} fold(s), {len(slots)} at a time", flush=True)
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
                          out / "predictions" / _method_key(s.key, opts.folds), test_cases, name=s.key) for s in specs]
    predict = prediction_jobs(opts, sets, images_ts, logs, log)
    if opts.dry_run:
        for job in predict:
            log.add(job.name, "planned", f"ensemble of fold(s) {' '.join(map(str, opts.folds))}", command=job.shell())
        log.add("evaluate", "planned", f"Dice and HD95 of WT, TC, ET against {labels_ts} ({opts.convention}); "
                f"write {out / 'table1.md'}, table1.csv, table1_boxplot.png, reproduce.json")
        return None
    if predict:
        for job in predict:
            (job.prediction.output / PredictionSet.STAMP).unlink(missing_ok=True)
        runner.run(predict)
        for job in predict:
            job.prediction.write_stamp()
            log.add(job.name, "ran", f"{len(test_cases)} case(s) -> {job.prediction.output}", job.seconds)

    # 5. evaluation and the table
    from .metrics import evaluate_folder, get_convention, write_results

    summaries = {}
    t0 = time.time()
    for spec, ps in zip(specs, sets):  # one table row per --trainers entry, named by its label
        summary = evaluate_folder(ps.output, labels_ts, opts.convention, n_jobs=opts.jobs, metrics=opts.metrics)
        write_results(summary, out / "metrics" / _method_key(spec.key, opts.folds))
        summaries[spec.label] = {k: v for k, v in summary.items() if k != "rows"}
    log.add("evaluate", "ran", f"{len(test_cases)} test case(s) x {len(sets)} trainer(s), convention "
            f"{opts.convention}", time.time() - t0)

    rows = [Table1Row.from_summary(t, s) for t, s in summaries.items() if "regions" in s]  # whole volume
    lesion_rows = [Table1Row.from_summary(t, s["lesionwise"]) for t, s in summaries.items() if "lesionwise" in s]
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
    markdown = "\n\n".join(
        ([f"Whole volume (legacy), convention {opts.convention}:\n\n{format_table1_markdown(rows)}"] if rows else []) +
        ([f"Lesion-wise (BraTS 2023 challenge ranking; docs/brats2023.md):\n\n{format_table1_markdown(lesion_rows)}"]
         if lesion_rows else []))
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "table1.md"
    md_path.write_text(f"# nnMamba Table 1 reproduction\n\n{caption}\n\n{markdown}\n\n"
                       "## Reported in the paper (Gong et al. 2024, Table 1), for comparison\n\n"
                       f"{format_table1_markdown(paper_rows())}\n")
    csv_path = write_table1_csv(rows or lesion_rows, out / "table1.csv")  # lesion-wise alone: its rows
    if rows and lesion_rows:
        write_table1_csv(lesion_rows, out / "table1_lesionwise.csv")
    png_path = plot_per_case(summaries if rows else {t: s["lesionwise"] for t, s in summaries.items()},
                             out / "table1_boxplot.png",
                             f"BraTS 2023 GLI test split ({len(test_cases)} cases), {folds_text}")
    json_path = out / "reproduce.json"
    content = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command_line(opts),
        "protocol": protocol_record(opts, dataset, plans_id if uses_run_plans else plans_of[specs[0].given], conf,
                                    classes, slots, env, specs, confs),
        "versions": versions(opts.device, slots),
        "steps": log.steps,
        "seconds_total": round(time.time() - started, 1),
        "table": {"markdown": markdown, "caption": caption, "rows": [asdict(r) for r in rows],
                  "lesionwise_rows": [asdict(r) for r in lesion_rows],
                  "paper": {m: {"dice": d, "hd95": h} for m, (d, h) in PAPER_TABLE1.items()}},
        "results": summaries,
        "files": {"markdown": str(md_path), "csv": str(csv_path), "boxplot": str(png_path), "json": str(json_path),
                  "metrics": str(out / "metrics"), "predictions": str(out / "predictions"), "logs": str(logs)},
    }
    json_path.write_text(json.dumps(content, indent=2) + "\n")
    print(f"\n{caption}\n\n{markdown}\n")
    print(f"wrote {md_path}, {csv_path}, {png_path} and {json_path} ({time.time() - started:.0f} s)")
    return content
