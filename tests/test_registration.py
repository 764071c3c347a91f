"""nnU-Net finds our trainers after a plain install: the .pth registration, wheel contents."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nnunet_mamba import _register

ROOT = Path(__file__).resolve().parents[1]


def test_register_appends_and_keeps_user_folders(tmp_path):
    env = {"nnUNet_extTrainer": f"/my/trainers{os.pathsep}/other"}
    folder = _register.register(env)
    assert folder is not None and Path(folder, "trainers_nnmamba.py").exists()
    parts = env["nnUNet_extTrainer"].split(os.pathsep)
    assert parts == ["/my/trainers", "/other", folder]
    _register.register(env)  # idempotent
    assert env["nnUNet_extTrainer"].split(os.pathsep).count(folder) == 1


def test_running_python_has_the_registration():
    # the editable install's .pth ran when this interpreter started
    assert _register.trainer_folder() in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(out)], check=True)
    return next(out.glob("nnunet_mamba-*.whl"))


def test_wheel_ships_pth_trainers_and_presets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "nnunet_mamba_register.pth" in names
    assert "nnunet_mamba_trainers/trainers_nnmamba.py" in names
    assert "nnunet_mamba_plans/paper.json" in names
    assert not any(n.startswith("nnunetv2/") for n in names), "never write into nnunetv2"


def test_plain_install_registers_through_site(wheel, tmp_path):
    """Unpack the wheel as a site dir; Python's site machinery runs our .pth."""
    site_dir = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site_dir)
    code = ("import os, site, sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p "
            "and 'nnunet' not in p and p not in ('', '.')]; site.addsitedir(sys.argv[1]); "
            "print(os.environ['nnUNet_extTrainer'])")
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env["nnUNet_extTrainer"] = "/user/folder"
    out = subprocess.run([sys.executable, "-S", "-c", code, str(site_dir)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(os.pathsep) == ["/user/folder", str(site_dir / "nnunet_mamba_trainers")]
