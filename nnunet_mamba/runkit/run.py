"""Device, seeding, run log and the optimisation step of the hand-written training loops."""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError


def resolve_device(name: Optional[str] = "auto") -> torch.device:
    """``auto`` (or empty) -> cuda if available, else cpu; a device torch does not know or a
    CUDA device without CUDA -> UserError (``--device``)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or "
                        "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available to torch here; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and torch's random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class RunLog:
    """Appends lines to one or more log files and echoes them on the console (through tqdm,
    so that a progress bar stays intact). ``timestamps``: prefix each file line with the
    local time."""

    def __init__(self, *paths: Path, echo: bool = True, timestamps: bool = True):
        self.paths = [Path(p) for p in paths]
        self.echo, self.timestamps = echo, timestamps
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str, console: bool = True) -> None:
        stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S')} " if self.timestamps else ""
        for p in self.paths:
            with open(p, "a") as f:
                f.write(f"{stamp}{line}\n")
        if self.echo and console:
            tqdm.write(line, file=sys.stdout)


def optimisation_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, where: str,
                      lr: float) -> float:
    """One step on ``loss``; returns its value. A non-finite loss stops the run with a
    UserError naming ``where`` (e.g. 'fold 0, epoch 3') and the learning rate to lower."""
    if not torch.isfinite(loss):
        raise UserError(f"{where}: the training loss became {loss.item()}; lower --lr (now {lr})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()
