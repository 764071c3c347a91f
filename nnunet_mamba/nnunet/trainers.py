"""Trainer classes: ours (``nnunet_mamba_trainers``) and the ones nnU-Net finds by name.

:func:`our_trainers` lists the classes our trainer modules define (used by the trainers
table and by the suggestions for a mistyped name); :func:`find_trainer_classes` and
:func:`find_trainer` look names up as ``nnUNetv2_train -tr`` does; :func:`check_networks`
builds each trainer's network for a set of plans before hours are spent training it.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import io
import os
import pkgutil
import sys
import warnings
from typing import Optional

from ..errors import UserError
from .folders import VARIABLES, environ_set

def our_trainers(base_only: bool = False, skip_broken: bool = False) -> list[type]:
    """Trainer classes defined in our trainer modules (``nnunet_mamba_trainers.*``), module by module.

    ``base_only``: leave out the variants (names with ``_``, e.g. ``nnMambaTrainer_smoke``).
    ``skip_broken``: pass over a module that fails to import (else its error is raised).
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnunet_mamba_trainers

    found = []
    for info in pkgutil.iter_modules(nnunet_mamba_trainers.__path__):
        try:
            mod = importlib.import_module(f"nnunet_mamba_trainers.{info.name}")
        except Exception:
            if skip_broken:
                continue
            raise
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and obj.__module__ == mod.__name__
                    and not name.startswith("_") and not (base_only and "_" in name)):
                found.append(obj)
    return found


def known_trainer_names() -> list[str]:
    """Names of nnU-Net's trainer classes loaded so far plus ours (for suggestions)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    names = set()
    for key, module in list(sys.modules.items()):
        if key.startswith("nnunetv2.training.nnUNetTrainer"):
            for obj in vars(module).values():
                if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and not obj.__name__.startswith("_"):
                    names.add(obj.__name__)
    with contextlib.suppress(ImportError):
        names.update(cls.__name__ for cls in our_trainers(skip_broken=True))
    return sorted(names)


def _lookup(name: str) -> type:
    """nnU-Net's own search for a trainer class (quietly: it prints every folder it looks into)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations inside the modules it imports
        return recursive_find_trainer_class_by_name(name)


def find_trainer_classes(names) -> dict:
    """Look every trainer up the way ``nnUNetv2_train`` does; unknown names are one UserError."""
    found, unknown = {}, []
    for name in names:
        try:
            found[name] = _lookup(name)
        except (RuntimeError, AssertionError):
            unknown.append(name)
    if unknown:
        known = known_trainer_names()
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


def find_trainer(trainer: str, env: dict[str, str]) -> tuple[bool, Optional[int]]:
    """(whether nnU-Net finds the trainer class with the folders of ``env``, its ``num_epochs``
    if it states one)."""
    with environ_set({k: env[k] for k in VARIABLES}):  # nnunetv2.paths reads them on import
        try:
            cls = _lookup(trainer)
        except Exception:
            return False, None
    if cls is None:
        return False, None
    epochs = getattr(cls, "hyperparameters", {}).get("num_epochs")
    return True, (int(epochs) if epochs is not None else None)


def check_networks(trainer_classes: dict, plans: dict, dataset_json: dict, configuration: str = "3d_fullres"):
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
