"""`nnmamba info`, `nnmamba plans`, and the CLI's handling of user errors."""
from __future__ import annotations

import json

import pytest

from nnunet_mamba.cli import main
from nnunet_mamba.nnunet.plans_presets import apply_preset, available_presets
from tests.test_nnmamba_seg import _plans


def test_info_reports_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "nnunetv2", "mamba-ssm", "cpu: runs", "cuda: runs", "nnUNet_extTrainer"):
        assert word in out


def unet_plans(patch=(40, 56, 48)):
    plans = _plans(patch=patch)
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"] = {
        "n_stages": 4, "features_per_stage": [32, 64, 128, 256], "kernel_sizes": [[3, 3, 3]] * 4,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3, "n_conv_per_stage": [2] * 4,
        "n_conv_per_stage_decoder": [2] * 3}
    return plans


def test_paper_preset_sets_patch_batch_and_recomputes_topology():
    preset = available_presets()["paper"]
    plans = unet_plans()
    new, notes = apply_preset(plans, preset)
    conf = new["configurations"]["3d_fullres"]
    assert conf["patch_size"] == [128, 128, 128] and conf["batch_size"] == 2 and not notes
    arch = conf["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 6 and arch["features_per_stage"] == [32, 64, 128, 256, 256, 256]
    assert len(arch["strides"]) == 6 and len(arch["n_conv_per_stage_decoder"]) == 5
    assert new["plans_name"] == "nnUNetPlans_nnMambaPaper"
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [40, 56, 48]  # source untouched


def test_plans_apply_writes_file_and_reports_missing_plans(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    folder = tmp_path / "Dataset999_Test"
    folder.mkdir()
    assert main(["plans", "apply", "paper", "-d", "Dataset999_Test"]) == 2
    assert "run nnUNetv2_plan_and_preprocess" in capsys.readouterr().err
    (folder / "nnUNetPlans.json").write_text(json.dumps(unet_plans()))
    assert main(["plans", "apply", "paper", "-d", "Dataset999_Test"]) == 0
    written = json.loads((folder / "nnUNetPlans_nnMambaPaper.json").read_text())
    assert written["configurations"]["3d_fullres"]["patch_size"] == [128, 128, 128]
    assert main(["plans", "apply", "nosuchpreset", "-d", "Dataset999_Test"]) == 2


def test_unknown_command_exits_non_zero():
    with pytest.raises(SystemExit) as e:
        main(["nosuchcommand"])
    assert e.value.code != 0
