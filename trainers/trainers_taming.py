"""Taming Mambas trainers (Lumetti et al. 2024, github.com/LucaLumetti/TamingMambas) in stock
nnU-Net v2: ``TamingSegMambaTrainer``, ``BiSegMambaTrainer``, ``MultiSegMambaTrainer``,
``SegMambaSkipTrainer``.

The networks are built from the plans' U-Net configuration (2D or 3D). Optimiser, schedule and
precision of the public code (its nnU-Net 2.1 trainers):

* RAdam, lr 3e-4, weight decay 3e-5 (nnU-Net's), gradient clipping at 12 (nnU-Net's);
* SegMamba (here ``TamingSegMambaTrainer``), BiSegMamba, SegMambaSkip: cosine annealing with
  ``T_max`` 100 epochs and a floor of 5e-6, evaluated in closed form at the epoch number as
  nnU-Net steps it; over more than 100 epochs the learning rate therefore rises again after
  each 100 (a cosine of period 200 epochs), exactly as in the public code;
* MultiSegMamba: a one-cycle schedule over the run (10 % cosine warm-up from lr/25 to lr,
  then cosine decay to lr/25/1e8), stepped per epoch; as torch's ``OneCycleLR``, runs of
  fewer than 10 epochs have no warm-up and a 1-epoch run (``_1epoch``, ``_smoke``) trains at
  the final, near-zero learning rate;
* epochs: 1000 (TamingSegMamba, SegMambaSkip) or 300 (BiSegMamba, MultiSegMamba), nnU-Net's
  250 iterations each; deep supervision and mixed precision on CUDA as nnU-Net, the Mamba
  layers in float32 with autocast off.
"""
import math

from torch.optim.lr_scheduler import _LRScheduler

from nnunet_mamba.networks.taming import BiSegMamba, MultiSegMamba, SegMambaSkip, TamingSegMamba
from nnunet_mamba.training.base import MambaTrainerBase, short_variants


def periodic_cosine_lr(initial_lr: float, epoch: int, t_max: int = 100, eta_min: float = 5e-6) -> float:
    """torch's ``CosineAnnealingLR`` closed form at ``epoch`` (period ``2 * t_max``)."""
    return eta_min + (initial_lr - eta_min) * (1 + math.cos(math.pi * epoch / t_max)) / 2


def one_cycle_lr(max_lr: float, step: int, total_steps: int, pct_start: float = 0.1,
                 div_factor: float = 25.0, final_div_factor: float = 1e8) -> float:
    """torch's ``OneCycleLR`` (cosine, two phases) at ``step`` of ``total_steps``."""
    initial = max_lr / div_factor
    phases = [(pct_start * total_steps - 1, initial, max_lr),
              (total_steps - 1, max_lr, initial / final_div_factor)]
    start = 0.0
    for i, (end, lr_from, lr_to) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = 1.0 if end == start else (step - start) / (end - start)
            return lr_to + (lr_from - lr_to) / 2 * (math.cos(math.pi * pct) + 1)
        start = end
    raise AssertionError("unreachable")


class EpochLRScheduler(_LRScheduler):
    """Sets the learning rate to ``lr_at(epoch)``; nnU-Net calls ``step(current_epoch)``."""

    def __init__(self, optimizer, lr_at, current_step=None):
        self.lr_at = lr_at
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


class _TamingMambasTrainer(MambaTrainerBase):
    """Shared settings of the Taming Mambas trainers (see the module docstring)."""

    optimizer_name = "radam"
    lr_schedule = "cosine"  # or "one_cycle"
    hyperparameters = {"initial_lr": 3e-4}

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()  # RAdam(lr, weight_decay)
        lr, epochs = self.initial_lr, self.num_epochs
        if self.lr_schedule == "cosine":
            return optimizer, EpochLRScheduler(optimizer, lambda e: periodic_cosine_lr(lr, e))
        if self.lr_schedule == "one_cycle":
            return optimizer, EpochLRScheduler(optimizer, lambda e: one_cycle_lr(lr, e, epochs))
        raise ValueError(f"{type(self).__name__}: unknown lr_schedule {self.lr_schedule!r}")


class TamingSegMambaTrainer(_TamingMambasTrainer):
    """Taming Mambas' SegMamba (unidirectional Mamba after every stage): RAdam 3e-4, periodic
    cosine, 1000 epochs."""

    network_class = TamingSegMamba


class BiSegMambaTrainer(_TamingMambasTrainer):
    """BiSegMamba: RAdam 3e-4, periodic cosine, 300 epochs."""

    network_class = BiSegMamba
    hyperparameters = {"num_epochs": 300}


class MultiSegMambaTrainer(_TamingMambasTrainer):
    """MultiSegMamba: RAdam 3e-4, one-cycle schedule, 300 epochs."""

    network_class = MultiSegMamba
    lr_schedule = "one_cycle"
    hyperparameters = {"num_epochs": 300}


class SegMambaSkipTrainer(_TamingMambasTrainer):
    """SegMambaSkip (bidirectional Mamba in the skips and the bottleneck): RAdam 3e-4,
    periodic cosine, 1000 epochs."""

    network_class = SegMambaSkip


for _trainer in (TamingSegMambaTrainer, BiSegMambaTrainer, MultiSegMambaTrainer,
                 SegMambaSkipTrainer):
    globals().update(short_variants(_trainer, __name__))
del _trainer
