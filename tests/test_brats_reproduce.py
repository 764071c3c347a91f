"""``nnmamba brats2023 reproduce``: the Table 1 protocol end to end on a tiny synthetic BraTS set (CPU).

The end-to-end test drives the real nnU-Net commands (plan_and_preprocess, nnUNetv2_train
with nnMambaTrainer_smoke and UNETRTrainer_smoke, nnUNetv2_predict) on 8 cases of 20x20x18
voxels with a 16^3 patch (UNETR needs multiples of 16), then checks the table, CSV, JSON and
PNG against the prediction files, and that a second invocation only re-evaluates. The other
tests cover the table layout, the resume decisions, the submitit executors (local jobs, the
Slurm parameters without a cluster) and bad input; they need no training.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_mamba.brats.jobs import CommandTask, Job, LocalJobs, SlurmJobs, parse_time
from nnunet_mamba.brats.provenance import command_line
from nnunet_mamba.brats.reproduce import ReproduceOptions, make_executor, validate_options
from nnunet_mamba.brats.steps import PredictionSet, StepLog, training_jobs
from nnunet_mamba.brats.synth import synthesize_dataset
from nnunet_mamba.brats.table1 import PAPER_TABLE1, Table1Row, format_table1_markdown, paper_rows, write_table1_csv
from nnunet_mamba.cli import main
from nnunet_mamba.errors import UserError
from nnunet_mamba.nnunet.commands import nnunet_env
from nnunet_mamba.nnunet.folders import NnUNetFolders, environ_set

TRAINERS = ("nnMambaTrainer_smoke", "UNETRTrainer_smoke")
DATASET_ID = 42
SHAPE = (20, 20, 18)  # x, y, z: the brains crop to <= 16^3, so each case is one 16^3 tile
N_CASES = 8           # 5 train, 1 val (fold 5), 2 test
PRESET = {"description": "tests: 3d_fullres patch 16^3 (UNETR needs multiples of 16), batch 2",
          "configuration": "3d_fullres", "patch_size": [16, 16, 16], "batch_size": 2, "plans_suffix": "Tiny16"}


def _run_cli(argv):
    """``nnmamba ...`` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _args(src, work, preset, *extra):
    return ["brats2023", "reproduce", str(src), "--trainers", *TRAINERS, "-d", str(DATASET_ID), "--work", str(work),
            "--device", "cpu", "--preset", str(preset), "-j", "1", *extra]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """One full reproduce run on the synthetic set (the module's expensive part), then a resumed one."""
    root = tmp_path_factory.mktemp("reproduce")
    src, work, preset = root / "src", root / "work", root / "tiny16.json"
    synthesize_dataset(src, N_CASES, SHAPE, seed=0)
    preset.write_text(json.dumps(PRESET))
    env = nnunet_env(work)  # what reproduce --work gives the nnU-Net subprocesses
    # fewer worker processes on a 2-core CI machine: augmentation in the training process
    # itself, one export worker (reproduce passes the user's values through)
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"})
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_def_n_proc")
    try:
        with environ_set({k: env[k] for k in keys}):
            t0 = time.time()
            first = _run_cli(_args(src, work, preset))
            first_seconds = time.time() - t0
            assert first[0] == 0, f"reproduce failed:\n{first[1][-4000:]}\n{first[2][-4000:]}"
            out = work / "nnUNet_results" / f"Dataset{DATASET_ID:03d}_BraTS2023GLI" / "reproduce_table1"
            stamps = {p: p.stat().st_mtime_ns for p in sorted((work / "nnUNet_results").rglob("checkpoint_final.pth"))}
            stamps.update({p: p.stat().st_mtime_ns for p in sorted((out / "predictions").rglob("*.nii.gz"))})
            first_json = json.loads((out / "reproduce.json").read_text())
            t0 = time.time()
            second = _run_cli(_args(src, work, preset))
            second_seconds = time.time() - t0
            yield {"src": src, "work": work, "preset": preset, "out": out, "first": first, "second": second,
                   "first_seconds": first_seconds, "second_seconds": second_seconds, "stamps": stamps,
                   "first_json": first_json}
    finally:
        shutil.rmtree(root, ignore_errors=True)  # UNETR checkpoints are ~1.2 GB each


@pytest.mark.slow
def test_reproduce_writes_table_csv_json_png(reproduced):
    out = reproduced["out"]
    raw = reproduced["work"] / "nnUNet_raw" / f"Dataset{DATASET_ID:03d}_BraTS2023GLI"
    content = reproduced["first_json"]  # reproduce.json as the first run wrote it
    protocol = content["protocol"]
    assert protocol["split"]["seed"] == 12345 and protocol["split"]["counts"] == {"train": 5, "val": 1, "test": 2}
    assert protocol["folds"] == [5] and protocol["configuration"] == "3d_fullres"
    assert protocol["plans"]["identifier"] == "nnUNetPlans_Tiny16" and protocol["plans"]["patch_size"] == [16, 16, 16]
    assert protocol["metrics"]["convention"]["name"] == "brats2023" and "MONAI" in protocol["metrics"]["hd95"]
    assert protocol["channels"] == {"_0000": "t1n", "_0001": "t1c", "_0002": "t2w", "_0003": "t2f"}
    assert protocol["regions_class_order"] == [2, 1, 3] and list(protocol["trainers"]) == list(TRAINERS)
    assert content["versions"]["nnunetv2"] and content["versions"]["torch"]
    test_cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTs").glob("*.nii.gz"))
    assert protocol["split"]["test_cases"] == test_cases and len(test_cases) == 2
    statuses = {s["step"]: s["status"] for s in content["steps"]}
    assert statuses["convert"] == "ran" and statuses["plan_and_preprocess"] == "ran"
    assert all(statuses[f"train {t} fold 5"] == "ran" for t in TRAINERS)

    # the table: rows = methods, Dice (%) and HD95 (mm) for WT, TC, ET, Average
    md = (out / "table1.md").read_text()
    assert ("| Method | Dice WT | Dice TC | Dice ET | Dice Average | HD95 WT | HD95 TC | HD95 ET | HD95 Average |"
            in md)
    assert "Reported in the paper" in md and "| nnMamba | 93.70 | 90.67 | 85.65 | 90.01 |" in md
    printed = reproduced["first"][1]
    assert content["table"]["markdown"] in printed
    with open(out / "table1.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == list(TRAINERS)
    for trainer in TRAINERS:
        summary = content["results"][trainer]
        assert sorted(summary["per_case"]) == test_cases
        row = rows[trainer]
        assert int(row["n_cases"]) == 2
        for region in ("WT", "TC", "ET"):
            dice = float(row[f"dice_{region}"])
            assert dice == pytest.approx(100 * summary["regions"][region]["dice"]["mean"], abs=1e-4)
            assert 0 <= dice <= 100 and float(row[f"hd95_{region}"]) >= 0
            # the table prints the unrounded mean (the CSV's rounded value can round the other
            # way at a ...5 boundary, e.g. 3.935 -> 3.94 while the table shows 3.93)
            assert f"{100 * summary['regions'][region]['dice']['mean']:.2f}" in content["table"]["markdown"]
        assert float(row["dice_Average"]) == pytest.approx(
            np.mean([float(row[f"dice_{r}"]) for r in ("WT", "TC", "ET")]), abs=1e-3)
        # the WT Dice recomputed from the prediction files by hand
        pred_dir = out / "predictions" / f"{trainer}__folds_5"
        wt = []
        for case in test_cases:
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{case}.nii.gz"))) > 0
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / f"{case}.nii.gz"))) > 0
            assert pred.shape == ref.shape == SHAPE[::-1]
            wt.append(2 * (pred & ref).sum() / (pred.sum() + ref.sum()) if pred.sum() + ref.sum() else 1.0)
        assert float(row["dice_WT"]) == pytest.approx(100 * np.mean(wt), abs=1e-3)
        assert (out / "metrics" / f"{trainer}__folds_5" / "per_case.csv").is_file()
    png = (out / "table1_boxplot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.slow
def test_second_run_resumes_without_training_or_predicting(reproduced):
    rc, printed, _ = reproduced["second"]
    assert rc == 0
    content = json.loads((reproduced["out"] / "reproduce.json").read_text())
    statuses = {s["step"]: s["status"] for s in content["steps"]}
    for step in ("convert", "plan_and_preprocess", "plans preset", *(f"train {t} fold 5" for t in TRAINERS),
                 *(f"predict {t} folds 5" for t in TRAINERS)):
        assert statuses[step] == "skipped", step
    for path, mtime in reproduced["stamps"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    assert len(reproduced["stamps"]) == 2 + 2 * 2
    assert content["results"] == reproduced["first_json"]["results"]
    assert reproduced["second_seconds"] < reproduced["first_seconds"] / 2


@pytest.mark.slow
def test_existing_dataset_with_another_split_is_refused(reproduced):
    rc, _, err = _run_cli(_args(reproduced["src"], reproduced["work"], reproduced["preset"], "--seed", "7",
                                "--dry-run"))
    assert rc == 2 and "exists with another split" in err and "seed" in err


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing(reproduced, tmp_path):
    work = tmp_path / "fresh"
    rc, printed, _ = _run_cli(_args(reproduced["src"], work, reproduced["preset"], "--dry-run"))
    assert rc == 0 and not work.exists()
    assert "[planned] convert" in printed and "nnUNetv2_plan_and_preprocess -d 42 -c 3d_fullres" in printed
    for trainer in TRAINERS:
        assert f"nnUNetv2_train 42 3d_fullres 5 -tr {trainer} -p nnUNetPlans_Tiny16 -device cpu" in printed
        assert f"-tr {trainer} -f 5 -device cpu" in printed


def test_unknown_trainer_fails_before_any_work(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "BraTS-GLI-00000-000").mkdir()
    work = tmp_path / "work"
    rc, _, err = _run_cli(["brats2023", "reproduce", str(src), "--trainers", "nnMambaTrainer_smoke",
                           "nnMambaTrainr", "--work", str(work), "--device", "cpu"])
    assert rc == 2
    assert "unknown trainer(s): nnMambaTrainr (did you mean nnMambaTrainer" in err
    assert not work.exists(), "work was done before the trainer check"


@pytest.mark.parametrize("extra,message", [
    (["--folds", "6"], "fold 6 does not exist"),
    (["--folds", "0", "5"], "cannot be mixed"),
    (["--folds", "1", "1"], "lists a fold twice"),
    (["--gpus", "2"], "--gpus 2 needs --device cuda"),
    (["--preset", "no-such-preset"], "unknown --preset 'no-such-preset'"),
    (["-d", "1000"], "dataset ID must be in 1-999"),
])
def test_bad_options_are_user_errors(extra, message, tmp_path):
    rc, _, err = _run_cli(["brats2023", "reproduce", str(tmp_path), "--trainers", "nnMambaTrainer",
                           "--work", str(tmp_path / "w"), "--device", "cpu", *extra])
    assert rc == 2 and message in err and not (tmp_path / "w").exists()


def test_missing_src_and_missing_folders(tmp_path, monkeypatch):
    rc, _, err = _run_cli(["brats2023", "reproduce", str(tmp_path / "nope"), "--trainers", "nnMambaTrainer",
                           "--device", "cpu", "--work", str(tmp_path / "w")])
    assert rc == 2 and "nope does not exist" in err and "BraTS-GLI-XXXXX-XXX" in err
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="pass --work DIR"):
        NnUNetFolders.resolve(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_a_user_error(tmp_path):
    rc, _, err = _run_cli(["brats2023", "reproduce", str(tmp_path), "--trainers", "nnMambaTrainer",
                           "--work", str(tmp_path / "w")])
    assert rc == 2 and "no CUDA GPU is visible" in err and "--device cpu" in err


# ----------------------------------------------------------------------------- table layout

def _summary(dice_fractions, hd95, n_cases=250):
    regions = {r: {"dice": {"mean": d, "std": 0.05}, "hd95": {"mean": h, "std": 2.0}}
               for r, d, h in zip(("WT", "TC", "ET"), dice_fractions, hd95)}
    return {"regions": regions, "n_cases": n_cases,
            "average": {"dice": float(np.mean(dice_fractions)), "hd95": float(np.mean(hd95))}}


def test_table1_layout_from_a_hand_made_summary(tmp_path):
    rows = [Table1Row.from_summary("nnMambaTrainer", _summary((0.9370, 0.9067, 0.8565), (3.88, 6.82, 11.59))),
            Table1Row.from_summary("UNETRTrainer", _summary((0.9333, 0.8989, 0.8519), (4.76, 7.27, 12.78)))]
    assert format_table1_markdown(rows).splitlines() == [
        "| Method | Dice WT | Dice TC | Dice ET | Dice Average | HD95 WT | HD95 TC | HD95 ET | HD95 Average |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| nnMambaTrainer | 93.70 | 90.67 | 85.65 | 90.01 | 3.88 | 6.82 | 11.59 | 7.43 |",
        "| UNETRTrainer | 93.33 | 89.89 | 85.19 | 89.47 | 4.76 | 7.27 | 12.78 | 8.27 |",
    ]
    assert rows[0].dice_std == pytest.approx((5.0, 5.0, 5.0)) and rows[0].hd95_std == (2.0, 2.0, 2.0)
    path = write_table1_csv(rows, tmp_path / "t.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == ("method,dice_WT,dice_TC,dice_ET,dice_Average,hd95_WT,hd95_TC,hd95_ET,hd95_Average,"
                        "dice_WT_std,dice_TC_std,dice_ET_std,hd95_WT_std,hd95_TC_std,hd95_ET_std,n_cases")
    assert lines[1] == ("nnMambaTrainer,93.7000,90.6700,85.6500,90.0067,3.8800,6.8200,11.5900,7.4300,"
                        "5.0000,5.0000,5.0000,2.0000,2.0000,2.0000,250")


def test_paper_table_transcription_is_consistent():
    """Each 'Average' of the paper's Table 1 is the mean of its WT, TC, ET (to the printed 2 decimals)."""
    for method, (dice, hd95) in PAPER_TABLE1.items():
        assert dice[3] == pytest.approx(np.mean(dice[:3]), abs=0.006), method
        assert hd95[3] == pytest.approx(np.mean(hd95[:3]), abs=0.006), method
    md = format_table1_markdown(paper_rows())
    assert "| nnUNet | 93.31 | 90.24 | 85.18 | 89.58 | 4.49 | 4.95 | 11.91 | 7.12 |" in md


# ----------------------------------------------------------------------------- resume decisions

def test_training_jobs_skip_finished_continue_interrupted(tmp_path, capsys):
    folders = NnUNetFolders(tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    base = folders.results / "Dataset042_X"
    for trainer, fold, ckpt in (("A", 0, "checkpoint_final.pth"), ("A", 1, "checkpoint_latest.pth"),
                                ("B", 0, "checkpoint_best.pth")):
        (base / f"{trainer}__P__3d_fullres" / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        (base / f"{trainer}__P__3d_fullres" / f"fold_{fold}" / ckpt).write_bytes(b"x")
    opts = ReproduceOptions(src=tmp_path, trainers=("A", "B", "C"), dataset_id=42, folds=(0, 1), device="cuda")
    log = StepLog()
    jobs = training_jobs(opts, folders, "Dataset042_X", "P", tmp_path / "logs", log)
    assert [(j.trainer, j.fold, j.resume) for j in jobs] == [("A", 1, True), ("B", 0, True), ("B", 1, False),
                                                            ("C", 0, False), ("C", 1, False)]
    assert jobs[0].argv == ["nnUNetv2_train", "42", "3d_fullres", "1", "-tr", "A", "-p", "P", "-device", "cuda", "--c"]
    assert "--c" not in jobs[2].argv and jobs[2].log == tmp_path / "logs" / "train_B_fold1.log"
    assert log.steps == [{"step": "train A fold 0", "status": "skipped",
                          "detail": f"{base / 'A__P__3d_fullres' / 'fold_0' / 'checkpoint_final.pth'} exists"}]


def test_prediction_stamp_tracks_checkpoints_and_cases(tmp_path):
    model = tmp_path / "model"
    for fold in (0, 1):
        (model / f"fold_{fold}").mkdir(parents=True)
        (model / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"weights")
    ps = PredictionSet("T", "P", (0, 1), model, tmp_path / "pred", ["c1", "c2"])
    ps.output.mkdir()
    (ps.output / "c1.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="c2.nii.gz"):
        ps.write_stamp()
    assert not ps.is_complete()
    (ps.output / "c2.nii.gz").write_bytes(b"")
    ps.write_stamp()
    assert ps.is_complete()
    (model / "fold_1" / "checkpoint_final.pth").write_bytes(b"retrained weights")
    assert not ps.is_complete(), "a retrained fold must invalidate the predictions"
    ps.write_stamp()
    (ps.output / "c1.nii.gz").unlink()
    assert not ps.is_complete()
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    assert not ps.is_complete()


# ----------------------------------------------------------------------------- executors (submitit)

_JOB = ("import json, os, sys, time; t0 = time.time(); time.sleep(1.5); "
        "open(sys.argv[1], 'w').write(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), t0, time.time()]))")


def test_local_executor_one_job_per_gpu_slot(tmp_path):
    python = Path(sys.executable).name
    jobs = [Job(f"job {i}", [python, "-c", _JOB, str(tmp_path / f"{i}.json")], tmp_path / "logs" / f"{i}.log")
            for i in range(3)]
    LocalJobs(dict(os.environ), ["3", "5"], tmp_path / "submitit").run(jobs)
    runs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(3)]
    assert {r[0] for r in runs} <= {"3", "5"} and {j.slot for j in jobs} <= {"3", "5"}
    assert all(r[0] == j.slot for r, j in zip(runs, jobs))
    overlapping = [(a, b) for a in range(3) for b in range(a + 1, 3)
                   if runs[a][1] < runs[b][2] and runs[b][1] < runs[a][2]]
    assert overlapping, "two slots, but the jobs ran one after another"
    for a, b in overlapping:
        assert runs[a][0] != runs[b][0], "two jobs shared one GPU at the same time"
    assert all(j.seconds >= 1.5 and j.error is None and j.job_id for j in jobs)
    assert "$ " in jobs[0].log.read_text() and "CUDA_VISIBLE_DEVICES=" in jobs[0].log.read_text()
    assert list((tmp_path / "submitit").glob("*_result.pkl")), "the jobs did not go through submitit"


def test_local_executor_reports_failures_after_the_others_finish(tmp_path):
    python = Path(sys.executable).name
    jobs = [Job("bad", [python, "-c", "raise SystemExit(3)"], tmp_path / "bad.log"),
            Job("good", [python, "-c", "import time; time.sleep(1); open(r'%s', 'w').write('done')"
                         % (tmp_path / "good.txt")], tmp_path / "good.log"),
            Job("missing", ["no-such-command-xyz"], tmp_path / "missing.log")]
    expected = (r"(?s)2 of 3 command\(s\) failed.*bad: command failed with exit code 3.*bad\.log"
                r".*missing: could not run no-such-command-xyz.*missing\.log")
    with pytest.raises(UserError, match=expected):
        LocalJobs(dict(os.environ), [None, None], tmp_path / "submitit").run(jobs)  # -j 2 on the CPU
    assert (tmp_path / "good.txt").read_text() == "done" and jobs[1].error is None


def test_training_task_continues_from_a_checkpoint(tmp_path):
    fold = tmp_path / "fold_0"
    job = Job("train T fold 0", ["nnUNetv2_train", "1", "3d_fullres", "0"], tmp_path / "t.log", fold_folder=fold)
    task = CommandTask(job, {})
    assert task.argv()[-1] == "0"
    fold.mkdir()
    (fold / "checkpoint_latest.pth").write_bytes(b"x")
    assert task.argv()[-1] == "--c"  # a requeued job (pre-emption, time limit) resumes
    requeued = task.checkpoint()
    assert requeued.function.argv()[-1] == "--c" and requeued.function.job.name == job.name


@pytest.mark.parametrize("text,minutes", [("720", 720), ("12:00:00", 720), ("0:30:01", 31), ("48:00:00", 2880)])
def test_slurm_time(text, minutes):
    assert parse_time(text) == minutes


def test_slurm_executor_parameters_without_a_cluster(tmp_path, monkeypatch):
    """The Slurm path builds submitit's SlurmExecutor and its sbatch file; nothing is submitted."""
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    opts = ReproduceOptions(src=tmp_path, trainers=("nnMambaTrainer",), dataset_id=42, folds=(0, 1), work=tmp_path,
                            executor="slurm", partition="gpu-h200", gpus_per_job=2, time="12:00:00")
    validate_options(opts)
    folders = NnUNetFolders.resolve(tmp_path)
    runner, slots, env = make_executor(opts, folders, tmp_path / "out")
    assert isinstance(runner, SlurmJobs) and slots == [] and runner.folder == tmp_path.resolve() / "submitit"
    assert env["nnUNet_n_proc_DA"] == "12" and runner.env["nnUNet_results"] == str(folders.results)
    assert "PATH" not in runner.env, "only what the run sets travels to the nodes"
    train = training_jobs(opts, folders, "Dataset042_X", "P", tmp_path / "logs", StepLog())
    assert train[0].argv[-2:] == ["-num_gpus", "2"] and train[0].gpus == 2
    params = runner.parameters(train[0])
    assert params == {"job_name": "nnmamba train nnMambaTrainer fold 0", "time": 720, "nodes": 1,
                      "ntasks_per_node": 1, "gpus_per_node": 2, "cpus_per_task": 28, "signal_delay_s": 120,
                      "stderr_to_stdout": True, "partition": "gpu-h200"}
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were here
    executor = runner.executor(train[0])
    assert executor.parameters["partition"] == "gpu-h200" and executor.parameters["time"] == 720
    sbatch = executor._make_submission_file_text("echo", "uid")
    for line in ("#SBATCH --partition=gpu-h200", "#SBATCH --time=720", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=28", "#SBATCH --signal=USR2@120"):
        assert line in sbatch
    task = runner.task(train[0], None)
    assert task.merge_environ and task.slot is None
    assert "--executor slurm --partition gpu-h200 --gpus-per-job 2 --time 12:00:00" in command_line(opts)
    local = ReproduceOptions(src=tmp_path, trainers=("nnMambaTrainer",), device="cpu", jobs=3)
    runner, slots, _ = make_executor(local, folders, tmp_path / "out")
    assert isinstance(runner, LocalJobs) and slots == [None] * 3
    assert "--executor local" in command_line(local) and "--time" not in command_line(local)


@pytest.mark.parametrize("options,message", [
    ({"partition": "gpu"}, "--partition only applies to --executor slurm"),
    ({"time": "60", "gpus_per_job": 2}, "--gpus-per-job, --time only applies to --executor slurm"),
    ({"executor": "pbs"}, "unknown --executor 'pbs'"),
    ({"executor": "slurm"}, "--executor slurm needs --time"),
    ({"executor": "slurm", "time": "12h"}, "--time '12h' is neither minutes"),
    ({"executor": "slurm", "time": "1:75:00"}, "neither minutes"),
    ({"executor": "slurm", "time": "0"}, "shorter than a minute"),
    ({"executor": "slurm", "time": "60", "gpus_per_job": 0}, "--gpus-per-job must be at least 1"),
    ({"executor": "slurm", "time": "60", "gpus": 2}, "use --gpus-per-job"),
    ({"executor": "slurm", "time": "60", "device": "cpu"}, "leave out --device cpu"),
])
def test_executor_options_are_validated(options, message, tmp_path):
    opts = ReproduceOptions(src=tmp_path, trainers=("nnMambaTrainer",), **{"device": "cuda", **options})
    with pytest.raises(UserError, match=re.escape(message)):
        validate_options(opts)


def test_executor_option_errors_on_the_command_line(tmp_path):
    rc, _, err = _run_cli(["brats2023", "reproduce", str(tmp_path), "--trainers", "nnMambaTrainer", "--work",
                           str(tmp_path / "w"), "--device", "cpu", "--partition", "gpu"])
    assert rc == 2 and "--partition only applies to --executor slurm" in err and not (tmp_path / "w").exists()
    rc, _, err = _run_cli(["brats2023", "reproduce", str(tmp_path), "--trainers", "nnMambaTrainer", "--work",
                           str(tmp_path / "w"), "--executor", "slurm", "--time", "60"])
    if shutil.which("sbatch") is None:
        assert rc == 2 and "not found on PATH" in err and "--executor local" in err
        assert not (tmp_path / "w").exists()
