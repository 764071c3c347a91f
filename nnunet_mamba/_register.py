"""Make stock nnunetv2 find our trainers (run at interpreter start by a .pth file).

nnunetv2 (>= 2.8) looks up a trainer class first in its own folder, then in the folders
listed in the environment variable ``nnUNet_extTrainer`` (``os.pathsep``-separated). The
file ``nnunet_mamba_register.pth``, installed into site-packages with this package, runs
this module at every Python start of the environment: it appends the folder of the
``nnunet_mamba_trainers`` package (``trainers/`` in the source tree) to that variable,
keeping whatever the user put there. Nothing is written into nnunetv2's own folder, so
uninstalling this package leaves nnunetv2 exactly as it was.

This module must stay cheap: it imports nothing heavy and never raises.
"""
import importlib.util
import os

ENV = "nnUNet_extTrainer"


def trainer_folder():
    """The folder holding our trainer modules, or None when the package is not installed."""
    try:
        spec = importlib.util.find_spec("nnunet_mamba_trainers")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def register(environ=os.environ):
    """Append our trainer folder to ``nnUNet_extTrainer``; returns the folder (or None)."""
    folder = trainer_folder()
    if folder is None:
        return None
    current = [p for p in environ.get(ENV, "").split(os.pathsep) if p.strip()]
    if folder not in (os.path.abspath(p) for p in current):
        environ[ENV] = os.pathsep.join(current + [folder])
    return folder


try:
    register()
except Exception:  # a broken registration must never break Python start-up
    pass
