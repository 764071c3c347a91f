"""Optimiser parameter groups: every optimiser of the package is built on these.

Mamba's ``A_log`` and ``D`` are marked ``_no_weight_decay`` (:mod:`nnunet_mamba.ssm`), as
mamba-ssm marks them; they get no weight decay, every other parameter gets ``weight_decay``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam,
              "sgd": torch.optim.SGD}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[{params, weight_decay}, {params marked _no_weight_decay, 0}]``; one group when
    nothing is left out of weight decay (or there is none)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if weight_decay and getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                   **kwargs) -> torch.optim.Optimizer:
    """``name`` ('adam', 'adamw', 'radam', 'sgd') over :func:`parameter_groups`."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}") from None
    return cls(parameter_groups(model, weight_decay), lr=lr, **kwargs)
