"""Packaging glue beyond setup.cfg: ship ``nnunet_mamba_register.pth``.

The .pth file makes every Python start of this environment append our trainer folder to
``nnUNet_extTrainer`` (keeping the user's value), so stock nnunetv2 finds our trainers
without any manual step. See nnunet_mamba/_register.py.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "nnunet_mamba_register.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        self.copy_file(os.path.join(here, "nnunet_mamba", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class editable_wheel_with_pth(editable_wheel):
    """``pip install -e .``: put the same .pth file into the editable wheel."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        here = os.path.dirname(os.path.abspath(__file__))
        self.copy_file(os.path.join(here, "nnunet_mamba", PTH), os.path.join(installation_dir, PTH))


setup(packages=find_packages(include=["nnunet_mamba", "nnunet_mamba.*"]) + ["nnunet_mamba_trainers", "nnunet_mamba_plans"],
      package_dir={"nnunet_mamba_trainers": "trainers", "nnunet_mamba_plans": "plans"},
      package_data={"nnunet_mamba_plans": ["*.json"]},
      cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
