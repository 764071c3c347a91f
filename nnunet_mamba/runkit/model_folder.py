"""A trained model folder of the hand-written pipelines and its checkpoints.

Layout: ``DIR/<config>`` (what the networks are and how the data were prepared) and
``DIR/fold_<k>/<checkpoint>`` per trained fold. Classification writes ``plans.json`` and
``fold_<k>/checkpoint_best.pth``, landmarks ``config.json`` and ``fold_<k>/checkpoint_final.pt``
/ ``checkpoint_best.pt``; the names are the pipelines' own (folders trained before stay
loadable), everything else is this module's:

* checkpoints are dictionaries of tensors, strings and numbers (:func:`save_checkpoint`),
  read back with ``torch.load(..., weights_only=True)``: no code runs from a checkpoint;
* a path read from the config (a fold's checkpoint) stays inside the folder
  (:func:`~nnunet_mamba.safe_io.confined`);
* the config is read with :func:`~nnunet_mamba.safe_io.load_json` (duplicate keys refused);
* :meth:`ModelFolder.load_ensemble` loads the fold networks for a fold ensemble.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from ..safe_io import confined, load_json


def save_checkpoint(path: Path, network: nn.Module, /, **meta) -> None:
    """``{"state_dict": CPU tensors, **meta}`` to ``path``; ``meta`` holds plain data only
    (strings, numbers, lists, dicts) so that :meth:`ModelFolder.load_checkpoint` reads it."""
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    torch.save({"state_dict": state, **meta}, path)


@dataclass(frozen=True)
class ModelFolder:
    """The model folder ``root`` written by the command ``producer`` (named in messages)."""

    root: Path
    config_name: str
    producer: str

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config_path(self) -> Path:
        return self.root / self.config_name

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold_{fold}"

    @staticmethod
    def checkpoint_name(fold: int, name: str) -> str:
        """The path of a fold's checkpoint relative to the folder."""
        return f"fold_{fold}/{name}"

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise UserError(f"{self.root}: not a model folder (no {self.config_name}); pass the "
                            f"--out folder of '{self.producer}'")
        config = load_json(self.config_path, f"restore the file written by '{self.producer}'")
        if not isinstance(config, dict):
            raise UserError(f"{self.config_path}: not a {self.config_name} of '{self.producer}'; "
                            "pass its --out folder")
        return config

    def trained_folds(self, checkpoint: str) -> list[int]:
        """Folds k with a ``fold_<k>/<checkpoint>`` file, ascending."""
        return sorted(int(p.parent.name[5:]) for p in self.root.glob(f"fold_*/{checkpoint}")
                      if p.parent.name[5:].isdigit())

    def load_checkpoint(self, relative: str, fold: int) -> dict:
        """The checkpoint ``relative`` (inside the folder) of ``fold`` as plain data."""
        path = confined(self.root, relative, f"checkpoint of fold {fold}")
        if not path.is_file():
            raise UserError(f"{path}: fold {fold} has no such checkpoint; train that fold "
                            f"('{self.producer}') or leave it out of --folds")
        try:  # tensors, strings and numbers only: no code runs from a checkpoint
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for anything but plain data
            raise UserError(f"{path}: not a checkpoint of '{self.producer}' (it holds more than "
                            f"tensors, strings and numbers, or is damaged: {type(err).__name__}); "
                            "restore it from the training run") from None

    def load_ensemble(self, checkpoints: Mapping[int, str], build: Callable[[dict], nn.Module],
                      device: torch.device) -> list[nn.Module]:
        """The networks of a fold ensemble, in eval mode on ``device``: for each fold ->
        checkpoint path of ``checkpoints``, ``build(checkpoint)`` with its weights loaded."""
        models = []
        for fold, relative in checkpoints.items():
            ckpt = self.load_checkpoint(relative, fold)
            model = build(ckpt)
            model.load_state_dict(ckpt["state_dict"])
            models.append(model.to(device).eval())
        return models


def check_folds(requested: Optional[list[int]], trained: list[int], folder: Path) -> list[int]:
    """``requested`` (default: all ``trained``), refused when one is not trained."""
    if requested is None:
        return list(trained)
    missing = sorted(set(requested) - set(trained))
    if missing:
        raise UserError(f"{folder}: fold(s) {missing} not trained (trained: {sorted(trained)}); "
                        "fix --folds")
    return list(requested)
