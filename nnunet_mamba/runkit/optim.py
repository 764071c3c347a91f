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


def optimizer_class(name: str) -> type:
    """The optimiser class of ``name`` ('adam', 'adamw', 'radam', 'sgd'); ValueError otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}") from None


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                   **kwargs) -> torch.optim.Optimizer:
    """``name`` ('adam', 'adamw', 'radam', 'sgd') over :func:`parameter_groups`."""
    return optimizer_class(name)(parameter_groups(model, weight_decay), lr=lr, **kwargs)


def accept_single_group_states(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Let ``optimizer`` (built on :func:`parameter_groups` of ``model``) load the state of
    an optimiser with one group over ``model.parameters()``, as the nnU-Net trainers wrote
    it before ``A_log`` / ``D`` got a group without weight decay: resuming such a run
    (``nnUNetv2_train ... --c``) keeps its moments; the groups keep their weight decay."""
    groups = optimizer.param_groups
    if len(groups) == 1 or not hasattr(optimizer, "register_load_state_dict_pre_hook"):
        return
    position = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
    new_index = [position[id(p)] for p in model.parameters()]  # old index -> new index

    def regroup(opt, state_dict):
        if len(state_dict["param_groups"]) != 1 or len(state_dict["param_groups"][0]["params"]) \
                != len(new_index):
            return None
        old = state_dict["param_groups"][0]
        state = {new_index[i]: v for i, v in state_dict["state"].items()}
        start, new_groups = 0, []
        for g in opt.param_groups:
            n = len(g["params"])
            new_groups.append({**old, "params": list(range(start, start + n)),
                               "weight_decay": g["weight_decay"]})
            start += n
        return {"state": state, "param_groups": new_groups}

    optimizer.register_load_state_dict_pre_hook(regroup)
