"""GPUAugmentationMixin: nnU-Net trainers whose training augmentation runs on the GPU.

nnU-Net's CPU workers still load the cases (nnU-Net's dataset class) and crop them (nnU-Net's
``nnUNetDataLoader``, with its foreground oversampling and the enlarged initial patch), but
apply no transform; the training loader is wrapped so that every batch is moved to the
training device and augmented there by :class:`GPUAugmentation`, built from the transforms
that the trainer's own ``get_training_transforms`` returns (same probabilities and ranges).
Validation batches, the loss, ``train_step`` and everything else stay nnU-Net's.

When it is on (decided in ``get_dataloaders``, logged in the training log):

* ``NNUNET_MAMBA_GPU_AUGMENTATION=0`` (or ``false``/``off``): never (nnU-Net's CPU path);
* ``NNUNET_MAMBA_GPU_AUGMENTATION=1`` (or ``true``/``on``): always, also on a CPU device
  (the batched path then runs in the main process; used by the tests);
* unset (or ``auto``): when the trainer runs on CUDA;
* a trainer class with ``gpu_augmentation = False`` never uses it;
* pipelines with transforms that have no batched version (the cascade's, elastic
  deformation, custom samplers) fall back to the CPU path with a line in the log.
"""
from __future__ import annotations

import os
from typing import ClassVar, Optional

import torch

from nnunet_mamba.training.gpu_augmentation import GPUAugmentation, UnsupportedTransform

ENV = "NNUNET_MAMBA_GPU_AUGMENTATION"
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def gpu_augmentation_setting(device: torch.device, class_setting: Optional[bool] = None,
                             environ=os.environ) -> tuple[bool, str]:
    """(on, reason) from the class attribute, ``NNUNET_MAMBA_GPU_AUGMENTATION`` and the device."""
    if class_setting is False:
        return False, "the trainer sets gpu_augmentation = False"
    value = environ.get(ENV, "auto").strip().lower()
    if value in _OFF:
        return False, f"{ENV}={environ[ENV]}"
    if value in _ON:
        return True, f"{ENV}={environ[ENV]}"
    if value not in ("", "auto"):
        raise ValueError(f"{ENV}={environ[ENV]!r} is not understood. Fix: set it to 1 (on), 0 (off) "
                         "or leave it unset (on for CUDA devices)")
    if device.type == "cuda":
        return True, "CUDA device (set NNUNET_MAMBA_GPU_AUGMENTATION=0 for nnU-Net's CPU augmentation)"
    return False, f"device {device.type} (GPU augmentation is automatic on CUDA only)"


class GPUAugmentedLoader:
    """Iterator over nnU-Net's training loader that augments each batch on ``device``.

    Yields ``{'data': (B, C, *patch), 'target': tensor or list, 'keys': ...}`` on the device;
    nnU-Net's ``train_step`` then finds its tensors already there. On CUDA the next batch's
    (pinned) host-to-device copy runs on a side stream while the current step computes.
    """

    def __init__(self, loader, augmentation: GPUAugmentation, device: torch.device):
        self.loader, self.augmentation, self.device = loader, augmentation, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead = None

    def _fetch(self) -> dict:
        batch = next(self.loader)
        if self.stream is None:
            return {**batch, "data": batch["data"].to(self.device), "target": batch["target"].to(self.device)}
        with torch.cuda.stream(self.stream):
            return {**batch, "data": batch["data"].to(self.device, non_blocking=True),
                    "target": batch["target"].to(self.device, non_blocking=True)}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self._ahead if self._ahead is not None else self._fetch()
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            batch["data"].record_stream(current)
            batch["target"].record_stream(current)
        self._ahead = self._fetch() if self.stream is not None else None
        data, target = self.augmentation(batch["data"], batch["target"])
        return {**batch, "data": data, "target": target}

    next = __next__


class GPUAugmentationMixin:
    """Put before ``nnUNetTrainer`` in the bases: ``class T(GPUAugmentationMixin, nnUNetTrainer)``.

    Overrides ``get_dataloaders`` (CPU workers: load + crop only; training batches augmented on
    the device) and ``on_train_end`` (shuts nnU-Net's workers down as before). Class attribute
    ``gpu_augmentation``: None = automatic (see the module docstring), False = never.
    """

    gpu_augmentation: ClassVar[Optional[bool]] = None

    def get_dataloaders(self):
        self.gpu_augmenter = None
        on, reason = gpu_augmentation_setting(self.device, self.gpu_augmentation)
        if not on:
            self.print_to_log_file(f"GPU augmentation off: {reason}")
            return super().get_dataloaders()
        built = {}
        nnunet_transforms = self.get_training_transforms  # nnU-Net's (static) method, or a subclass's

        def translate(patch_size, *args, **kwargs):
            transforms = nnunet_transforms(patch_size, *args, **kwargs)
            labels = list(self.label_manager.all_labels)
            if self.label_manager.ignore_label is not None:
                labels.append(self.label_manager.ignore_label)
            try:
                built["aug"] = GPUAugmentation.from_nnunet(transforms, labels, len(patch_size))
            except UnsupportedTransform as e:
                built["why"] = str(e)
                return transforms
            return None  # the loader then returns its crops of the enlarged patch, untransformed

        # the instance attribute shadows the static method for this one call of nnU-Net's code
        self.get_training_transforms = translate
        try:
            dl_train, dl_val = super().get_dataloaders()
        finally:
            del self.get_training_transforms
        if "aug" not in built:
            self.print_to_log_file(f"GPU augmentation off: {built.get('why', 'no training transforms')}; "
                                   "nnU-Net's CPU augmentation is used")
            return dl_train, dl_val
        self.gpu_augmenter = built["aug"]
        self.print_to_log_file(f"GPU augmentation on ({reason}): CPU workers load and crop, "
                               f"{len(self.gpu_augmenter.steps)} batched steps run on {self.device}")
        return GPUAugmentedLoader(dl_train, self.gpu_augmenter, self.device), dl_val

    def on_train_end(self):
        if isinstance(self.dataloader_train, GPUAugmentedLoader):
            self.dataloader_train = self.dataloader_train.loader  # nnU-Net shuts its workers down
        super().on_train_end()
