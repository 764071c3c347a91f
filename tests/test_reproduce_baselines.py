"""``nnmamba brats2023 reproduce`` rows on their own plans: nnU-Net's residual-encoder presets
(ResEnc M / L, planned by nnU-Net's planners) beside trainers on the run's plans.

The command construction is checked without training; the slow test plans ResEnc M with
nnU-Net's own planner on a dataset nnU-Net has already preprocessed (the plans reuse its data).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from nnunet_mamba.brats.baselines import BASELINES, parse_trainer_spec, parse_trainer_specs
from nnunet_mamba.brats.jobs import LocalJobs
from nnunet_mamba.brats.reproduce import ReproduceOptions
from nnunet_mamba.brats.steps import (DatasetState, PredictionSet, StepLog, plan_and_preprocess, prediction_jobs,
                                      training_jobs)
from nnunet_mamba.brats.synth import synthesize_dataset
from nnunet_mamba.cli import main
from nnunet_mamba.errors import UserError
from nnunet_mamba.nnunet.folders import NnUNetFolders
from nnunet_mamba.nnunet.trainers import check_networks
from tests.test_e2e_nnunet import DATASET_ID as E2E_ID
from tests.test_e2e_nnunet import planned  # noqa: F401  (fixture)

ROWS = ("nnMambaTrainer", "nnUNetTrainer", "nnUNetTrainer_ResEncM", "nnUNetTrainer_ResEncL")


def test_entries_name_trainer_plans_and_row():
    assert {k: v[:2] for k, v in BASELINES.items()} == {
        "nnUNetTrainer_ResEncM": ("nnUNetTrainer", "nnUNetResEncUNetMPlans"),
        "nnUNetTrainer_ResEncL": ("nnUNetTrainer", "nnUNetResEncUNetLPlans"),
        "nnUNetTrainer_ResEncXL": ("nnUNetTrainer", "nnUNetResEncUNetXLPlans")}
    plain, resenc, own = map(parse_trainer_spec, ("SegMambaV2Trainer", "nnUNetTrainer_ResEncM",
                                                  "nnUNetTrainer_5epochs:nnUNetResEncUNetLPlans"))
    assert (plain.trainer, plain.plans, plain.label, plain.key) == ("SegMambaV2Trainer", None, "SegMambaV2Trainer",
                                                                    "SegMambaV2Trainer")
    assert plain.plans_id("nnUNetPlans_nnMambaPaper") == "nnUNetPlans_nnMambaPaper"
    assert (resenc.trainer, resenc.plans_id("X"), resenc.label, resenc.key) == (
        "nnUNetTrainer", "nnUNetResEncUNetMPlans", "nnU-Net ResEnc M", "nnUNetTrainer_ResEncM")
    assert (own.trainer, own.plans, own.label, own.key) == (
        "nnUNetTrainer_5epochs", "nnUNetResEncUNetLPlans", "nnUNetTrainer_5epochs (nnUNetResEncUNetLPlans)",
        "nnUNetTrainer_5epochs__nnUNetResEncUNetLPlans")


@pytest.mark.parametrize("entries,preset,message", [
    (["nnUNetTrainer:"], None, "is not TRAINER, TRAINER:PLANS"),
    (["nnUNetTrainer:a/b"], None, "is not TRAINER, TRAINER:PLANS"),
    (["nnUNetTrainer", "nnUNetTrainer:nnUNetPlans"], None, "both train nnUNetTrainer on plans nnUNetPlans"),
    (["nnUNetTrainer_ResEncM", "nnUNetTrainer:nnUNetResEncUNetMPlans"], None, "both train"),
    (["nnUNetTrainer_ResEncM"], "paper", "drop --preset"),
])
def test_bad_entries_are_user_errors(entries, preset, message):
    with pytest.raises(UserError, match=message):
        parse_trainer_specs(entries, "nnUNetPlans", preset)


def test_a_preset_keeps_the_plain_row_apart_from_the_same_trainer_on_the_source_plans():
    specs = parse_trainer_specs(["nnUNetTrainer", "nnUNetTrainer:nnUNetPlans"], "nnUNetPlans_nnMambaPaper", "paper")
    assert [s.plans_id("nnUNetPlans_nnMambaPaper") for s in specs] == ["nnUNetPlans_nnMambaPaper", "nnUNetPlans"]


def test_training_and_prediction_commands_use_each_rows_plans(tmp_path):
    folders = NnUNetFolders(tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    done = folders.results / "Dataset042_X" / "nnUNetTrainer__nnUNetResEncUNetLPlans__3d_fullres" / "fold_5"
    done.mkdir(parents=True)
    (done / "checkpoint_final.pth").write_bytes(b"x")
    opts = ReproduceOptions(src=tmp_path, trainers=ROWS, dataset_id=42, device="cuda")
    log = StepLog()
    jobs = training_jobs(opts, folders, "Dataset042_X", "nnUNetPlans_P", tmp_path / "logs", log)
    assert [j.shell() for j in jobs] == [
        "nnUNetv2_train 42 3d_fullres 5 -tr nnMambaTrainer -p nnUNetPlans_P -device cuda",
        "nnUNetv2_train 42 3d_fullres 5 -tr nnUNetTrainer -p nnUNetPlans_P -device cuda",
        "nnUNetv2_train 42 3d_fullres 5 -tr nnUNetTrainer -p nnUNetResEncUNetMPlans -device cuda"]
    assert [j.name for j in jobs][2] == "train nnUNetTrainer_ResEncM fold 5" and jobs[2].plans == "nnUNetResEncUNetMPlans"
    assert len({j.log for j in jobs}) == 3 and jobs[2].log.name == "train_nnUNetTrainer_ResEncM_fold5.log"
    assert log.steps[0]["step"] == "train nnUNetTrainer_ResEncL fold 5" and log.steps[0]["status"] == "skipped"

    specs = parse_trainer_specs(ROWS, "nnUNetPlans_P")
    sets = [PredictionSet(s.trainer, s.plans_id("nnUNetPlans_P"), (5,), tmp_path / s.key, tmp_path / "pred" / s.key,
                          ["c1"], name=s.key) for s in specs]
    predict = prediction_jobs(opts, sets, tmp_path / "imagesTs", tmp_path / "logs", StepLog())
    assert [(j.argv[j.argv.index("-tr") + 1], j.argv[j.argv.index("-p") + 1]) for j in predict] == [
        ("nnMambaTrainer", "nnUNetPlans_P"), ("nnUNetTrainer", "nnUNetPlans_P"),
        ("nnUNetTrainer", "nnUNetResEncUNetMPlans"), ("nnUNetTrainer", "nnUNetResEncUNetLPlans")]
    assert len({j.log for j in predict}) == 4 and predict[3].name == "predict nnUNetTrainer_ResEncL folds 5"


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_dry_run_plans_resenc_with_nnunets_planners_after_the_fingerprint(tmp_path):
    src, work, preset = tmp_path / "src", tmp_path / "work", tmp_path / "tiny.json"
    synthesize_dataset(src, 8, (16, 16, 16), seed=0)
    preset.write_text(json.dumps({"configuration": "3d_fullres", "patch_size": [16, 16, 16], "batch_size": 2,
                                  "plans_suffix": "Tiny16"}))
    rc, printed, err = _run_cli(["brats2023", "reproduce", str(src), "--trainers", *ROWS, "-d", "42", "--work",
                                 str(work), "--device", "cpu", "--preset", str(preset), "-j", "2", "--dry-run"])
    assert rc == 0, err
    assert not work.exists()
    lines = [line.strip() for line in printed.splitlines()]
    plan = [line for line in lines if line.startswith("$ nnUNetv2_plan")]
    assert plan == ["$ nnUNetv2_plan_and_preprocess -d 42 -c 3d_fullres -pl ExperimentPlanner -np 2 -npfp 2",
                    "$ nnUNetv2_plan_experiment -d 42 -pl nnUNetPlannerResEncM",
                    "$ nnUNetv2_plan_experiment -d 42 -pl nnUNetPlannerResEncL"]
    train = [line for line in lines if line.startswith("$ nnUNetv2_train")]
    assert train == [f"$ nnUNetv2_train 42 3d_fullres 5 -tr {t} -p {p} -device cpu" for t, p in (
        ("nnMambaTrainer", "nnUNetPlans_Tiny16"), ("nnUNetTrainer", "nnUNetPlans_Tiny16"),
        ("nnUNetTrainer", "nnUNetResEncUNetMPlans"), ("nnUNetTrainer", "nnUNetResEncUNetLPlans"))]
    assert sum("nnUNetv2_predict" in line and "-p nnUNetResEncUNetMPlans -tr nnUNetTrainer" in line
               for line in lines) == 1


@pytest.mark.slow
def test_resenc_m_planned_by_nnunets_planner_reuses_the_preprocessed_data(planned, tmp_path):  # noqa: F811
    """nnUNetv2_plan_experiment -pl nnUNetPlannerResEncM on a preprocessed dataset: the plans
    build nnU-Net's ResidualEncoderUNet and train on the existing nnUNetPlans_3d_fullres data."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    source, env, _ = planned
    name = f"Dataset{E2E_ID:03d}_Tiny"
    folders = NnUNetFolders(tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed", tmp_path / "nnUNet_results")
    shutil.copytree(source / "nnUNet_raw" / name, folders.raw / name)  # a copy: the fixture stays as it is
    shutil.copytree(source / "nnUNet_preprocessed" / name, folders.preprocessed / name)
    (folders.preprocessed / name / "splits_final.json").unlink(missing_ok=True)
    cases = sorted(p.name[: -len(".pkl")] for p in (folders.preprocessed / name / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    (folders.raw / name / "splits_final.json").write_text(json.dumps([{"train": cases[1:], "val": cases[:1]}]))
    env = {**env, "nnUNet_raw": str(folders.raw), "nnUNet_preprocessed": str(folders.preprocessed),
           "nnUNet_results": str(folders.results)}
    opts = ReproduceOptions(src=tmp_path, trainers=("nnUNetTrainer_ResEncM",), dataset_id=E2E_ID, name="Tiny",
                            device="cpu", jobs=1)
    dataset = DatasetState(folders.raw / name, name, {"train": cases, "val": [], "test": []})
    log = StepLog()
    plan_and_preprocess(opts, folders, dataset, LocalJobs(env, [None], tmp_path / "submitit"), log, tmp_path / "logs",
                        plans="nnUNetResEncUNetMPlans")
    assert log.steps[-1]["step"] == "plan_and_preprocess nnUNetResEncUNetMPlans"
    assert log.steps[-1]["status"] == "ran"
    assert log.steps[-1]["detail"] == f"nnUNetv2_plan_experiment -d {E2E_ID} -pl nnUNetPlannerResEncM"
    plans = json.loads((folders.preprocessed / name / "nnUNetResEncUNetMPlans.json").read_text())
    conf = plans["configurations"]["3d_fullres"]
    assert plans["plans_name"] == "nnUNetResEncUNetMPlans" and conf["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert conf["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    dataset_json = json.loads((folders.preprocessed / name / "dataset.json").read_text())
    check_networks({"nnUNetTrainer": recursive_find_trainer_class_by_name("nnUNetTrainer")}, plans, dataset_json)
    assert json.loads((folders.preprocessed / name / "splits_final.json").read_text())[0]["val"] == cases[:1]

    again = StepLog()
    plan_and_preprocess(opts, folders, dataset, LocalJobs(env, [None], tmp_path / "submitit"), again, tmp_path / "logs",
                        plans="nnUNetResEncUNetMPlans")
    assert again.steps[-1]["status"] == "skipped"
    assert Path(folders.preprocessed / name / "nnUNetPlans.json").is_file()
