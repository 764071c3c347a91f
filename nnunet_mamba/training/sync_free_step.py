"""SyncFreeStepMixin: nnU-Net's training step without waiting for the GPU.

nnU-Net's ``train_step`` stops the CPU twice per iteration until the GPU has finished all
queued work: ``GradScaler.step`` reads the "found inf" flag of an unfused optimiser with
``.item()``, and the step returns ``loss.detach().cpu().numpy()``. After each stop the GPU
idles while Python queues the next iteration (take the batch, augmentation, forward). For a
network whose step is bound by kernel launches, as the Mamba networks' are, that idle time
is a large part of the iteration.

On CUDA this mixin keeps the same arithmetic and removes both stops:

* the optimiser is built ``fused=True`` where PyTorch has a fused version (SGD, Adam,
  AdamW): ``GradScaler`` then hands the inf flag and the scale to the fused kernel, which
  skips the update on the device when a gradient is not finite, exactly as the unfused
  path skips it on the host (:meth:`optimizer_options`);
* ``train_step`` returns the loss as a device tensor and :meth:`on_train_epoch_end` moves
  the epoch's losses to the host at once, so the logged mean is the same number;
* likewise ``validation_step`` keeps the loss and the pseudo-Dice counts (true/false
  positives, false negatives) on the device and :meth:`on_validation_epoch_end` reads the
  epoch's at once (nnU-Net's step reads them after each of the 50 validation batches).

Experimental, off by default: with ``NNUNET_MAMBA_CUDA_GRAPHS=1`` (or ``cuda_graphs =
True``) and nnU-Net's ``torch.compile`` on, the step replays the network's forward and
backward as CUDA graphs (:attr:`SyncFreeStepMixin.training_network`,
``torch.compile(mode='reduce-overhead')`` of the same module): one launch per graph instead
of a thousand kernel launches. Validation, the final prediction and the checkpoints use
nnU-Net's compiled network. On the H200 this made nnMamba's second epoch 11.3 s instead of
~20 s, but the eval-mode network after that epoch was wrong (pseudo Dice 0.27 against 0.98
without graphs) while the training loss was right: the BatchNorm running statistics are the
suspect (updated inside the graphs). Trainers with BatchNorm therefore re-estimate them with
the plain module before every validation when the steps were graphed
(``MambaTrainerBase.recalibrate_batchnorm``); whether that suffices is not yet measured.

Autocast, gradient scaling, unscaling, nnU-Net's gradient clipping at norm 12 and the
order of operations are nnU-Net's. ``NNUNET_MAMBA_SYNC_FREE_STEP=0`` (or a class attribute
``sync_free_step = False``) keeps nnU-Net's own step; on a CPU device the step is nnU-Net's
unless ``NNUNET_MAMBA_SYNC_FREE_STEP=1`` (tests).
"""
from __future__ import annotations

import inspect
import os
from typing import ClassVar, Optional

import numpy as np
import torch

ENV = "NNUNET_MAMBA_SYNC_FREE_STEP"
GRAPHS_ENV = "NNUNET_MAMBA_CUDA_GRAPHS"


def sync_free_setting(device: torch.device, class_setting: Optional[bool] = None) -> bool:
    """Whether the sync-free step runs: ``ENV`` = 0/1 or the class attribute False/True
    decide (1/True: also on a CPU device, for tests); otherwise on CUDA only."""
    value = os.environ.get(ENV, "").strip().lower()
    if class_setting is False or value in ("0", "false", "off", "no"):
        return False
    if class_setting or value in ("1", "true", "on", "yes"):
        return True
    return device.type == "cuda"


def cuda_graphs_setting(device: torch.device, class_setting: Optional[bool] = None) -> bool:
    """Whether the sync-free step replays the compiled network as CUDA graphs (experimental):
    only on CUDA and only when ``GRAPHS_ENV`` = 1 or the class attribute is True (and, at the
    step, with nnU-Net's torch.compile on; never under DDP, whose wrapper it would bypass)."""
    value = os.environ.get(GRAPHS_ENV, "").strip().lower()
    if class_setting is False or value in ("0", "false", "off", "no") or device.type != "cuda":
        return False
    return bool(class_setting) or value in ("1", "true", "on", "yes")


def supports_fused(optimizer_class: type) -> bool:
    """Whether ``optimizer_class`` takes ``fused=True`` (SGD, Adam, AdamW in PyTorch >= 2.4)."""
    try:
        return "fused" in inspect.signature(optimizer_class).parameters
    except (TypeError, ValueError):
        return False


class SyncFreeStepMixin:
    """Put before ``nnUNetTrainer`` in the bases. See the module docstring.

    Subclasses that build their own optimiser pass ``**self.optimizer_options(cls)`` to it.
    """

    sync_free_step: ClassVar[Optional[bool]] = None
    cuda_graphs: ClassVar[Optional[bool]] = None

    @property
    def _sync_free(self) -> bool:
        return sync_free_setting(self.device, self.sync_free_step)

    def optimizer_options(self, optimizer_class: type) -> dict:
        """``{'fused': True}`` when the sync-free step runs and the class has a fused kernel."""
        return {"fused": True} if self._sync_free and supports_fused(optimizer_class) else {}

    def configure_optimizers(self):
        """nnU-Net's optimiser (SGD, momentum 0.99, Nesterov, ``weight_decay``) and poly
        schedule, fused when the sync-free step runs."""
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr,
                                    weight_decay=self.weight_decay, momentum=0.99, nesterov=True,
                                    **self.optimizer_options(torch.optim.SGD))
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    @property
    def training_network(self) -> torch.nn.Module:
        """The module ``train_step`` calls: with CUDA graphs on (see :func:`cuda_graphs_setting`)
        ``torch.compile(network, mode='reduce-overhead')`` of the same module, built on first
        use; otherwise ``self.network``. Validation and checkpoints keep ``self.network``."""
        graphed = getattr(self, "_graphed_network", None)
        if graphed is not None and graphed[0] is self.network:
            return graphed[1]
        net = self.network
        if not (isinstance(net, torch._dynamo.eval_frame.OptimizedModule) and self._sync_free
                and cuda_graphs_setting(self.device, self.cuda_graphs)):
            return net  # not compiled by nnU-Net (nnUNet_compile=false), DDP, CPU, or off
        mode = "reduce-overhead"
        self._graphed_network = (net, torch.compile(net._orig_mod, mode=mode))
        self.print_to_log_file(f"training step: torch.compile(mode={mode!r}) (CUDA graphs, experimental: "
                               f"{GRAPHS_ENV}=1); validation: nnU-Net's compiled network")
        return self._graphed_network[1]

    def _on_device(self, batch: dict):
        """(data, target) of a batch on the training device (target: a tensor or, with deep
        supervision, a list of them), copied without blocking the host."""
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        return batch["data"].to(self.device, non_blocking=True), target

    def train_step(self, batch: dict) -> dict:
        if not self._sync_free:
            return super().train_step(batch)
        network = self.training_network
        data, target = self._on_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if network is not self.network:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are dead
            self.graphed_steps = getattr(self, "graphed_steps", 0) + 1
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            loss = self.loss(network(data), target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)  # fused: no host read of the inf flag
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach()}

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (its loss, and the counts of its pseudo Dice on the
        full-resolution output: sigmoid > 0.5 per region, or argmax per label without the
        background; voxels of the ignore label masked out), results left on the device."""
        if not self._sync_free:
            return super().validation_step(batch)
        from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

        data, target = self._on_device(batch)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            output = self.network(data)
            loss = self.loss(output, target)
        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        labels = self.label_manager
        if labels.has_regions:
            prediction = (torch.sigmoid(output) > 0.5).long()
        else:  # one-hot of the argmax, float16 as in nnU-Net
            prediction = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
            prediction.scatter_(1, output.argmax(1, keepdim=True), 1)
        mask = None
        if labels.has_ignore_label and labels.has_regions:  # the last target channel marks ignored voxels
            mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
            target = target[:, :-1]
        elif labels.has_ignore_label:
            mask = (target != labels.ignore_label).float()
            target = target.masked_fill(target == labels.ignore_label, 0)
        tp, fp, fn, _ = get_tp_fp_fn_tn(prediction, target, axes=[0, *range(2, output.ndim)], mask=mask)
        if not labels.has_regions:  # no background Dice
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        return {"loss": loss.detach(), "tp_hard": tp.detach(), "fp_hard": fp.detach(), "fn_hard": fn.detach()}

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        if val_outputs and isinstance(val_outputs[0].get("loss"), torch.Tensor):
            val_outputs = _outputs_to_host(val_outputs)
        return super().on_validation_epoch_end(val_outputs)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        if train_outputs and isinstance(train_outputs[0].get("loss"), torch.Tensor):
            train_outputs = _outputs_to_host(train_outputs)
        return super().on_train_epoch_end(train_outputs)


def _outputs_to_host(outputs: list[dict]) -> list[dict]:
    """An epoch's step outputs with their device tensors as the NumPy arrays nnU-Net's steps
    return (0-d arrays for scalars), one host transfer per key for the whole epoch."""
    host = {k: torch.stack([o[k] for o in outputs]).cpu().numpy()
            for k, v in outputs[0].items() if isinstance(v, torch.Tensor)}
    return [{**o, **{k: np.asarray(values[i]) for k, values in host.items()}} for i, o in enumerate(outputs)]
