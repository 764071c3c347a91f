"""GPUAugmentationMixin: nnU-Net trainers whose training augmentation runs on the GPU.

nnU-Net's CPU workers still load the cases (nnU-Net's dataset class) and crop them
(:class:`CroppingLoader`: nnU-Net's sampling, foreground oversampling and enlarged-patch
placement, cut to the box the batch's rotation/scaling reads), but apply no transform; every
batch is moved to the training device and augmented there by :class:`GPUAugmentation`, built
from the transforms that the trainer's own ``get_training_transforms`` returns (same
probabilities and ranges).
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

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_mamba.training.gpu_augmentation import GPUAugmentation, SpatialStep, UnsupportedTransform

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


FLOAT16_MAX = 65504.0
CROP_ENV = "NNUNET_MAMBA_GPU_AUGMENTATION_CROP"  # "batch" (default) or "full": see CroppingLoader


class CroppingLoader(nnUNetDataLoader):
    """nnU-Net's training loader for the GPU path: load and crop only, and send little.

    Sampling is nnU-Net's own: its cases (``get_indices``), its foreground oversampling
    (``get_do_oversample``) and the placement of its enlarged initial patch (``get_bbox``).
    But before anything is read, the batch's rotation/scaling parameters are drawn
    (``spatial_step.sample``, nnU-Net's draws) and only the centred part of each enlarged
    patch that they read is cropped (:meth:`SpatialStep.needed_extent`): the final patch
    when no sample is rotated or scaled, which nnU-Net's default probabilities make the
    common case. Images travel as float16 (float32 if a value exceeds float16's range; the
    network sees float16 under AMP anyway), labels as int8 when the dataset's labels fit. For BraTS plans
    (patch 112x160x128, enlarged 208x238x196) the workers read, and pass on to the main
    process and the GPU, ~8x fewer bytes than nnU-Net's whole enlarged patch in float32.

    Returns ``{'data': (B, C, *box), 'target': (B, Cs, *box), 'keys', 'spatial': params}``;
    :class:`GPUAugmentedLoader` hands ``spatial`` to :class:`GPUAugmentation`.
    ``crop='full'`` returns nnU-Net's whole enlarged patch in float32 (for comparisons).
    """

    def __init__(self, *args, spatial_step: SpatialStep, crop: str = "batch", **kwargs):
        super().__init__(*args, transforms=None, **kwargs)
        if crop not in ("batch", "full"):
            raise ValueError(f"{CROP_ENV}={crop!r} is not understood. Fix: 'batch' (default) or 'full'")
        self.spatial_step, self.crop = spatial_step, crop
        label_manager = args[4] if len(args) > 4 else kwargs["label_manager"]
        values = list(label_manager.all_labels) + [label_manager.ignore_label or 0, -1]
        self.label_dtype = torch.int8 if min(values) >= -128 and max(values) <= 127 else torch.int16

    def generate_train_batch(self) -> dict:
        if self.crop == "full":
            batch = super().generate_train_batch()
            return {**batch, "spatial": self.spatial_step.sample(*batch["data"].shape[:2])}
        keys = self.get_indices()
        cases = [self._data.load_case(k) for k in keys]
        initial = self.patch_size[1:] if self.patch_size_was_2d else self.patch_size
        spatial = self.spatial_step.sample(len(keys), cases[0][0].shape[0])
        box = self.spatial_step.needed_extent(spatial, initial)
        box = (1, *box) if self.patch_size_was_2d else tuple(box)
        data = seg = None
        for j, (image, label, label_prev, properties) in enumerate(cases):
            lbs, _ = self.get_bbox(image.shape[1:], self.get_do_oversample(j), properties["class_locations"])
            # the box shares the enlarged patch's centre (center_crop_slices' convention)
            lbs = [lb + size // 2 - b // 2 for lb, size, b in zip(lbs, self.patch_size, box)]
            bbox = [[lb, lb + b] for lb, b in zip(lbs, box)]
            image = torch.from_numpy(crop_and_pad_nd(image, bbox, 0))
            label = torch.from_numpy(crop_and_pad_nd(label, bbox, -1, cast_cropped_to=np.int16))
            if label_prev is not None:  # the cascade (its transforms keep it on nnU-Net's CPU path)
                prev = crop_and_pad_nd(label_prev, bbox, -1, cast_cropped_to=np.int16)
                label = torch.cat((label, torch.from_numpy(prev)[None]))
            if self.patch_size_was_2d:
                image, label = image[:, 0], label[:, 0]
            if data is None:  # written in place, converted on the copy (torch's casts are vectorised)
                data = torch.empty((len(cases), *image.shape), dtype=torch.float16)
                seg = torch.empty((len(cases), *label.shape), dtype=self.label_dtype)
            if data.dtype == torch.float16 and image.numel():
                low, high = torch.aminmax(image)
                if max(-float(low), float(high)) > FLOAT16_MAX:
                    data = data.float()
            data[j] = image
            seg[j] = label
        return {"data": data, "target": seg, "keys": keys, "spatial": spatial}


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
        data, target = self.augmentation(batch["data"], batch["target"], spatial=batch.get("spatial"))
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
        """nnU-Net's ``get_dataloaders`` with the training loader replaced by
        :class:`CroppingLoader` + :class:`GPUAugmentedLoader` (validation unchanged)."""
        self.gpu_augmenter = None
        on, reason = gpu_augmentation_setting(self.device, self.gpu_augmentation)
        if not on:
            self.print_to_log_file(f"GPU augmentation off: {reason}")
            return super().get_dataloaders()
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        cm, lm = self.configuration_manager, self.label_manager
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = lm.foreground_regions if lm.has_regions else None
        transforms = self.get_training_transforms(
            cm.patch_size, rotation, ds_scales, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
            is_cascaded=self.is_cascaded, foreground_labels=lm.foreground_labels, regions=regions,
            ignore_label=lm.ignore_label)
        labels = list(lm.all_labels) + ([lm.ignore_label] if lm.ignore_label is not None else [])
        try:
            augmentation = GPUAugmentation.from_nnunet(transforms, labels, len(cm.patch_size))
        except UnsupportedTransform as e:
            self.print_to_log_file(f"GPU augmentation off: {e}; nnU-Net's CPU augmentation is used")
            return super().get_dataloaders()
        val_transforms = self.get_validation_transforms(ds_scales, is_cascaded=self.is_cascaded,
                                                        foreground_labels=lm.foreground_labels,
                                                        regions=regions, ignore_label=lm.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        common = dict(oversample_foreground_percent=self.oversample_foreground_percent,
                      sampling_probabilities=None, pad_sides=None,
                      probabilistic_oversampling=self.probabilistic_oversampling)
        dl_tr = CroppingLoader(dataset_tr, self.batch_size, initial_patch, cm.patch_size, lm,
                               spatial_step=augmentation.spatial_step,
                               crop=os.environ.get(CROP_ENV, "batch").strip().lower() or "batch", **common)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, cm.patch_size, cm.patch_size, lm,
                                  transforms=val_transforms, **common)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            mt_train, mt_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:  # nnU-Net's worker counts and queue lengths
            pin = self.device.type == "cuda"
            mt_train = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None,
                                                    pin_memory=pin, wait_time=0.002)
            mt_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None,
                                                  pin_memory=pin, wait_time=0.002)
        self.gpu_augmenter = augmentation
        self.print_to_log_file(f"GPU augmentation on ({reason}): CPU workers load and crop ({dl_tr.crop} box), "
                               f"{len(augmentation.steps)} batched steps run on {self.device}")
        train = GPUAugmentedLoader(mt_train, augmentation, self.device)
        _ = next(mt_train), next(mt_val)  # start the workers, as nnU-Net does
        return train, mt_val

    def on_train_end(self):
        if isinstance(self.dataloader_train, GPUAugmentedLoader):
            self.dataloader_train = self.dataloader_train.loader  # nnU-Net shuts its workers down
        super().on_train_end()
