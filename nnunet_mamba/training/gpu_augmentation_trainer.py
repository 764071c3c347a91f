"""GPUAugmentationMixin: nnU-Net trainers whose training augmentation runs on the GPU.

nnU-Net's CPU workers still load the cases (nnU-Net's dataset class) and crop them
(:class:`CroppingLoader`: nnU-Net's sampling, foreground oversampling and enlarged-patch
placement, cut to the box the batch's rotation/scaling reads), but apply no transform; every
batch is moved to the training device and augmented there by :class:`GPUAugmentation`, built
from the transforms that the trainer's own ``get_training_transforms`` returns (same
probabilities and ranges). Validation batches are nnU-Net's: the same loader cuts nnU-Net's
validation patch (no enlargement, no augmentation) and nnU-Net's validation transforms
(label removal, regions, deep-supervision targets) run on the device, so that few workers
feed validation as fast as training. The loss, ``train_step``, ``validation_step`` and
everything else stay nnU-Net's.

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

import math
import os
from typing import ClassVar, Optional

import numpy as np
import torch
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
#: nnU-Net normalisations whose output fits float16 (z-scores of an image or of CT values
#: clipped to percentiles, [0, 1] rescalings); with any other the loader checks each crop
FLOAT16_SAFE_NORMALIZATIONS = ("ZScoreNormalization", "CTNormalization", "RescaleTo01Normalization",
                               "RGBTo01Normalization")
CROP_ENV = "NNUNET_MAMBA_GPU_AUGMENTATION_CROP"  # "batch" (default) or "full": see CroppingLoader


class CroppingLoader(nnUNetDataLoader):
    """nnU-Net's loader for the GPU path: load and crop only, and send little.

    Sampling is nnU-Net's own: its cases (``get_indices``), its foreground oversampling
    (``get_do_oversample``) and the placement of its enlarged initial patch (``get_bbox``).
    But before anything is read, the batch's rotation/scaling parameters are drawn
    (``spatial_step.sample``, nnU-Net's draws) and only the centred part of each enlarged
    patch that they read is cropped (:meth:`SpatialStep.needed_extent`): the final patch
    when no sample is rotated or scaled, which nnU-Net's default probabilities make the
    common case. With ``spatial_step=None`` (validation) it cuts nnU-Net's patch as it is.
    The batch is written in place into shared memory (the queue to the main process then
    passes it on without a copy; zeros / -1 outside the image, nnU-Net's padding). Images
    travel as float16 (float32 if a value exceeds float16's range, checked per crop unless
    ``check_float16_range=False``; the network sees float16 under AMP anyway), labels as
    int8 when the dataset's labels fit. For BraTS plans (patch 112x160x128, enlarged
    208x238x196) the workers read, and pass on to the main process and the GPU, ~8x fewer
    bytes than nnU-Net's whole enlarged patch in float32.

    Returns ``{'data': (B, C, *box), 'target': (B, Cs, *box), 'keys', 'spatial': params}``;
    :class:`GPUAugmentedLoader` hands ``spatial`` to :class:`GPUAugmentation`.
    ``crop='full'`` returns nnU-Net's whole enlarged patch in float32 (for comparisons).
    """

    def __init__(self, *args, spatial_step: Optional[SpatialStep], crop: str = "batch",
                 check_float16_range: bool = True, **kwargs):
        super().__init__(*args, transforms=None, **kwargs)
        self.check_float16_range = check_float16_range
        if crop not in ("batch", "full"):
            raise ValueError(f"{CROP_ENV}={crop!r} is not understood. Fix: 'batch' (default) or 'full'")
        self.spatial_step, self.crop = spatial_step, crop
        label_manager = args[4] if len(args) > 4 else kwargs["label_manager"]
        values = list(label_manager.all_labels) + [label_manager.ignore_label or 0, -1]
        self.label_dtype = torch.int8 if min(values) >= -128 and max(values) <= 127 else torch.int16

    def generate_train_batch(self) -> dict:
        if self.crop == "full":
            batch = super().generate_train_batch()
            step = self.spatial_step
            return {**batch, "spatial": step.sample(*batch["data"].shape[:2]) if step else None}
        keys = self.get_indices()
        cases = [self._data.load_case(k) for k in keys]
        initial = self.patch_size[1:] if self.patch_size_was_2d else self.patch_size
        if self.spatial_step is None:  # validation: nnU-Net's patch as it is
            spatial, box = None, tuple(initial)
        else:
            spatial = self.spatial_step.sample(len(keys), cases[0][0].shape[0])
            box = tuple(self.spatial_step.needed_extent(spatial, initial))
        full_box = (1, *box) if self.patch_size_was_2d else box
        n_image = cases[0][0].shape[0]
        n_label = cases[0][1].shape[0] + (cases[0][2] is not None)
        # written in place, in shared memory: the queue to the main process passes it on
        # without a copy; zeros outside the images (nnU-Net pads images with 0), -1 outside the labels
        data = _shared_empty((len(cases), n_image, *box), torch.float16)
        seg = _shared_empty((len(cases), n_label, *box), self.label_dtype)
        # a 2D patch is one slice of the 3D case: that axis goes (axis 1 of the crops)
        first = 0 if self.patch_size_was_2d else slice(None)
        for j, (image, label, label_prev, properties) in enumerate(cases):
            lbs, _ = self.get_bbox(image.shape[1:], self.get_do_oversample(j), properties["class_locations"])
            # the box shares the enlarged patch's centre (center_crop_slices' convention)
            lbs = [lb + size // 2 - b // 2 for lb, size, b in zip(lbs, self.patch_size, full_box)]
            src, dst = _overlap(lbs, full_box, image.shape[1:], self.patch_size_was_2d)
            if src is None or any(d.stop - d.start != n for d, n in zip(dst, box)):
                data[j], seg[j] = 0, -1  # (part of) the box lies outside the image
            if src is None:
                continue
            crop = torch.from_numpy(np.ascontiguousarray(image[(slice(None), *src)]))[:, first]
            if data.dtype == torch.float16 and self.check_float16_range and crop.numel():
                low, high = torch.aminmax(crop)
                if max(-float(low), float(high)) > FLOAT16_MAX:
                    data = _shared_empty(data.shape, torch.float32).copy_(data)
            data[(j, slice(None), *dst)] = crop  # converted on the copy (vectorised)
            seg[(j, slice(0, label.shape[0]), *dst)] = torch.from_numpy(
                np.ascontiguousarray(label[(slice(None), *src)]))[:, first]
            if label_prev is not None:  # the cascade (its transforms keep it on nnU-Net's CPU path)
                seg[(j, -1, *dst)] = torch.from_numpy(np.ascontiguousarray(label_prev[src]))[first]
        return {"data": data, "target": seg, "keys": keys, "spatial": spatial}


def _shared_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in shared memory (what torch's queue pickling would copy
    it into), or in ordinary memory where shared memory cannot be had."""
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
    except (AttributeError, RuntimeError):
        return torch.empty(tuple(shape), dtype=dtype)


def _overlap(lower, size, shape, drop_first: bool):
    """Slices (source in the image, destination in the box) of the part of the box
    [lower, lower + size) that lies inside ``shape``; (None, None) if none does.
    ``drop_first``: a 2D patch of a 3D case, the first axis (extent 1) is dropped from the
    destination."""
    src, dst = [], []
    for lb, n, s in zip(lower, size, shape):
        lo, hi = max(lb, 0), min(lb + n, s)
        if hi <= lo:
            return None, None
        src.append(slice(lo, hi))
        dst.append(slice(lo - lb, hi - lb))
    return tuple(src), tuple(dst[1:] if drop_first else dst)


class GPUAugmentedLoader:
    """Iterator over nnU-Net's (training or validation) loader whose batches ``augmentation``
    transforms on ``device``.

    Yields ``{'data': (B, C, *patch), 'target': tensor or list, 'keys': ...}`` on the device;
    nnU-Net's ``train_step`` / ``validation_step`` then find their tensors already there.
    On CUDA the next batch's (pinned) host-to-device copy runs on a side stream while the
    current step computes.
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
        try:  # validation batches: nnU-Net's patches and transforms, the transforms on the device
            val_augmentation = GPUAugmentation.from_nnunet(val_transforms, labels, len(cm.patch_size),
                                                           validation=True)
        except UnsupportedTransform:
            val_augmentation = None
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        common = dict(oversample_foreground_percent=self.oversample_foreground_percent,
                      sampling_probabilities=None, pad_sides=None,
                      probabilistic_oversampling=self.probabilistic_oversampling)
        crop = os.environ.get(CROP_ENV, "batch").strip().lower() or "batch"
        # nnU-Net's normalisations bound the values (z-scores, [0, 1]); others are checked per crop
        check_range = any(s not in FLOAT16_SAFE_NORMALIZATIONS for s in cm.normalization_schemes)
        dl_tr = CroppingLoader(dataset_tr, self.batch_size, initial_patch, cm.patch_size, lm,
                               spatial_step=augmentation.spatial_step, crop=crop,
                               check_float16_range=check_range, **common)
        if val_augmentation is not None:
            dl_val = CroppingLoader(dataset_val, self.batch_size, cm.patch_size, cm.patch_size, lm,
                                    spatial_step=None, crop=crop, check_float16_range=check_range, **common)
        else:
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
                               f"{len(augmentation.steps)} batched steps run on {self.device}; validation "
                               + ("transforms on the device too" if val_augmentation else "on nnU-Net's CPU path"))
        train = GPUAugmentedLoader(mt_train, augmentation, self.device)
        val = GPUAugmentedLoader(mt_val, val_augmentation, self.device) if val_augmentation else mt_val
        _ = next(mt_train), next(mt_val)  # start the workers, as nnU-Net does
        return train, val

    def on_train_end(self):
        if isinstance(self.dataloader_train, GPUAugmentedLoader):
            self.dataloader_train = self.dataloader_train.loader  # nnU-Net shuts its workers down
        if isinstance(self.dataloader_val, GPUAugmentedLoader):
            self.dataloader_val = self.dataloader_val.loader
        super().on_train_end()
