"""nnU-Net's training augmentation, batched on the training device.

:class:`GPUAugmentation` is built *from nnU-Net's own pipeline*: the trainer's
``get_training_transforms`` (nnU-Net 2.8's, or a subclass's) returns batchgeneratorsv2
transform objects, and :meth:`GPUAugmentation.from_nnunet` turns each of them into a batched
step with the same probabilities and ranges, read from those objects. Random parameters are
drawn on the host, per sample, with the transforms' own ``get_parameters`` (the spatial
transform: with the same draws, without building its grid); the tensors never leave the
device. Pipelines with a transform that has no batched twin (the cascade's one-hot / morphology
transforms, elastic deformation, custom callables) raise :class:`UnsupportedTransform` and
the trainer keeps nnU-Net's CPU path.

Input: the CPU loader's centred crops of nnU-Net's enlarged initial patch (the whole patch,
or the smaller box :meth:`SpatialStep.needed_extent` gives for the batch's parameters),
``data (B, C, *box)`` float32 or float16 and ``target (B, Cs, *box)`` int16 or int8 (padding -1). Output: what nnU-Net's
transforms would give, ``data (B, C, *patch)`` and the target (label map int16 or regions
bool), a list over the deep-supervision scales when deep supervision is on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import sample_scalar
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import (SpatialTransform, create_affine_matrix_2d,
                                                          create_affine_matrix_3d)
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

from nnunet_mamba.training import gpu_augmentation_ops as ops


class UnsupportedTransform(ValueError):
    """nnU-Net's pipeline holds a transform that has no batched twin here."""


def _dummy(n_channels: int, dim: int) -> torch.Tensor:
    """A stand-in image for ``get_parameters``: only its channel count and rank are read."""
    return torch.empty((n_channels,) + (1,) * dim)


def _check_scalar(value, what: str):
    if isinstance(value, (int, float, BGContrast)) or (isinstance(value, (tuple, list)) and len(value) == 2):
        return
    raise UnsupportedTransform(f"{what}: a callable range ({value!r}) is only supported on the CPU path")


class Step:
    """One batched transform: ``sample`` draws parameters on the host, ``apply`` runs on the tensors."""

    def sample(self, n_samples: int, n_channels: int) -> list:
        raise NotImplementedError

    def apply(self, img: torch.Tensor, seg, params):
        raise NotImplementedError


class SpatialStep(Step):
    """SpatialTransform (rotation, scaling, centre crop); ``pseudo2d``: in-plane only, the
    first axis folded into the channels as Convert3DTo2DTransform does."""

    def __init__(self, t: SpatialTransform, pseudo2d: bool, label_values: Sequence[int]):
        if t.p_elastic_deform > 0:
            raise UnsupportedTransform("SpatialTransform with elastic deformation")
        if t.random_crop:
            raise UnsupportedTransform("SpatialTransform with random_crop=True")
        if t.mode_image != "bilinear" or t.padding_mode_image not in ("zeros", "constant") \
                or t.align_corners or t.mode_seg not in ("bilinear", "nearest") \
                or t.border_mode_seg not in ("zeros", "constant") or t.seg_tiebreak == "highest":
            raise UnsupportedTransform(f"SpatialTransform settings {t!r}")
        if t.padding_mode_image == "constant" and t.padding_value_image != 0:
            raise UnsupportedTransform("SpatialTransform with a non-zero image padding value")
        _check_scalar(t.rotation, "rotation")
        _check_scalar(t.scaling, "scaling")
        self.t, self.pseudo2d = t, pseudo2d
        self.patch_size = tuple(int(i) for i in t.patch_size)
        self.pad_label = int(t.padding_value_seg) if t.border_mode_seg == "constant" else 0
        self.label_values = [int(v) for v in label_values]

    def sample(self, n_samples: int, n_channels: int) -> dict:
        """SpatialTransform.get_parameters' draws (angles, scales) without its grid."""
        t, dim = self.t, len(self.patch_size)
        affines, transformed = np.tile(np.eye(dim), (n_samples, 1, 1)), np.zeros(n_samples, bool)
        img = _dummy(n_channels, dim)
        for b in range(n_samples):
            do_rotation = np.random.uniform() < t.p_rotation
            do_scale = np.random.uniform() < t.p_scaling
            np.random.uniform()  # the elastic-deformation draw (its probability is 0)
            angles = [0.0] * dim
            if do_rotation:
                angles = [sample_scalar(t.rotation, image=img, dim=i) for i in range(dim)]
                if t.p_rot_per_axis < 1:
                    angles = [0.0 if np.random.uniform() > t.p_rot_per_axis else a for a in angles]
            scales = [1.0] * dim
            if do_scale:
                if np.random.uniform() <= t.p_synchronize_scaling_across_axes:
                    scales = [sample_scalar(t.scaling, image=img, dim=None)] * dim
                else:
                    scales = [sample_scalar(t.scaling, image=img, dim=i) for i in range(dim)]
            if do_rotation or do_scale:
                transformed[b] = True
                affines[b] = create_affine_matrix_3d(angles, scales) if dim == 3 else \
                    create_affine_matrix_2d(angles[-1], scales)
        return {"affines": affines, "transformed": transformed}

    def needed_extent(self, params: dict, in_shape: Sequence[int]) -> tuple:
        """The smallest box, centred like ``in_shape``, that this batch's transforms read.

        Samples without rotation/scaling read the final patch; a rotated or scaled one reads
        the bounding box of its transformed patch plus two voxels for the linear
        interpolation. Each axis keeps the parity of ``in_shape`` (same centre), at most
        ``in_shape`` (where the enlarged patch is needed whole). Pseudo-2D: the first axis
        is kept whole. Cropping the input to this box leaves :meth:`apply`'s result unchanged.
        """
        in_shape = [int(s) for s in in_shape]
        lead = in_shape[:1] if self.pseudo2d else []
        plane = in_shape[len(lead):]
        need = np.asarray(self.patch_size, np.float64)
        half = (need - 1) / 2
        corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(len(half), -1)
        for b in np.flatnonzero(params["transformed"]):
            reach = np.abs(np.asarray(params["affines"][b], np.float64) @ corners).max(1)
            need = np.maximum(need, 2 * reach + 4)
        out = []
        for n, s in zip(np.ceil(need).astype(int), plane):
            n += (n - s) % 2  # the parity of the input: the same centre after a centred crop
            out.append(min(int(n), s))
        return tuple(lead + out)

    def apply(self, img, seg, params):
        b = img.shape[0]
        if self.pseudo2d:  # (B, C, Z, Y, X) -> (B, C*Z, Y, X), as Convert3DTo2DTransform
            z = img.shape[2]
            img, seg = img.reshape(b, -1, *img.shape[3:]), seg.reshape(b, -1, *seg.shape[3:])
        img, seg = ops.spatial_transform(img, seg, self.patch_size, params["affines"],
                                         params["transformed"], self.label_values, self.pad_label,
                                         self.t.mode_seg, self.t.seg_tiebreak)
        if self.pseudo2d:
            img = img.reshape(b, -1, z, *img.shape[2:])
            seg = seg.reshape(b, -1, z, *seg.shape[2:])
        return img, seg


class RandomIntensityStep(Step):
    """An intensity transform applied with probability ``p`` per sample (RandomTransform)."""

    KINDS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
             ContrastTransform, SimulateLowResolutionTransform, GammaTransform)

    def __init__(self, t, p: float, dim: int):
        for name in ("noise_variance", "blur_sigma", "multiplier_range", "contrast_range", "scale", "gamma"):
            if hasattr(t, name):
                _check_scalar(getattr(t, name), f"{type(t).__name__}.{name}")
        if isinstance(t, SimulateLowResolutionTransform) and t.allowed_channels is not None:
            raise UnsupportedTransform("SimulateLowResolutionTransform with allowed_channels")
        self.t, self.p, self.dim = t, float(p), dim

    def sample(self, n_samples: int, n_channels: int) -> dict:
        t, c, dim = self.t, n_channels, self.dim
        img = _dummy(c, dim)
        out = {"applied": np.zeros(n_samples, bool)}
        if isinstance(t, GaussianNoiseTransform):
            out["sigma"] = np.zeros((n_samples, c))
        elif isinstance(t, GaussianBlurTransform):
            out["sigmas"] = np.zeros((n_samples, c, dim))
        elif isinstance(t, (MultiplicativeBrightnessTransform, ContrastTransform)):
            out["factors"] = np.ones((n_samples, c), np.float32)
        elif isinstance(t, GammaTransform):
            out.update(gamma=np.zeros((n_samples, c), np.float32), invert=np.zeros((n_samples, c), bool),
                       retain=np.zeros((n_samples, c), bool))
        else:
            out["jobs"] = []
        for b in range(n_samples):
            if not torch.rand(1).item() < self.p:  # RandomTransform.get_parameters
                continue
            out["applied"][b] = True
            prm = t.get_parameters(image=img)
            if isinstance(t, GaussianNoiseTransform):
                idx = prm["apply_idx"].tolist()
                if prm["sigmas"] is not None:
                    sig = prm["sigmas"] if isinstance(prm["sigmas"], list) else [prm["sigmas"]] * len(idx)
                    out["sigma"][b, idx] = sig
            elif isinstance(t, GaussianBlurTransform):
                idx = np.flatnonzero(prm["apply_to_channel"].numpy())
                sig = prm["sigmas"]
                for j, ch in enumerate(idx):
                    out["sigmas"][b, ch] = sig if t.synchronize_channels else sig[j]
            elif isinstance(t, (MultiplicativeBrightnessTransform, ContrastTransform)):
                if prm["multipliers"] is not None:
                    out["factors"][b, prm["apply_to_channel"].tolist()] = prm["multipliers"].numpy()
            elif isinstance(t, GammaTransform):
                idx = prm["apply_to_channel"].tolist()
                if idx:
                    out["gamma"][b, idx] = prm["gamma"].numpy()
                    out["invert"][b, idx] = prm["invert_image"].numpy()
                    out["retain"][b, idx] = prm["retain_stats"].numpy()
            else:  # SimulateLowResolutionTransform
                for ch, s in zip(prm["apply_to_channel"], prm["scales"]):
                    out["jobs"].append((b, int(ch), s.tolist()))
        return out

    def apply(self, img, seg, params):
        t = self.t
        if isinstance(t, GaussianNoiseTransform):
            ops.gaussian_noise(img, params["sigma"])
        elif isinstance(t, GaussianBlurTransform):
            ops.gaussian_blur(img, params["sigmas"])
        elif isinstance(t, MultiplicativeBrightnessTransform):
            ops.multiplicative_brightness(img, params["factors"])
        elif isinstance(t, ContrastTransform):
            ops.contrast(img, params["factors"], t.preserve_range)
        elif isinstance(t, GammaTransform):
            ops.gamma(img, params["gamma"], params["invert"], params["retain"])
        else:
            ops.simulate_low_resolution(img, params["jobs"])
        return img, seg


class MirrorStep(Step):
    def __init__(self, t: MirrorTransform):
        self.t = t

    def sample(self, n_samples, n_channels):
        return {"axes": [self.t.get_parameters()["axes"] for _ in range(n_samples)]}

    def apply(self, img, seg, params):
        ops.mirror([img, seg], params["axes"])
        return img, seg


class LabelStep(Step):
    """The deterministic steps: masking, label removal, regions, deep-supervision targets."""

    def __init__(self, t):
        self.t = t

    def sample(self, n_samples, n_channels):
        return {}

    def apply(self, img, seg, params):
        t = self.t
        if isinstance(t, MaskImageTransform):
            ops.mask_image(img, seg, t.apply_to_channels, t.channel_idx_in_seg, t.set_outside_to)
        elif isinstance(t, RemoveLabelTransform):
            ops.remove_label(seg, t.label_value, t.set_to, t.segmentation_channels)
        elif isinstance(t, ConvertSegmentationToRegionsTransform):
            seg = ops.to_regions(seg, [r.long().tolist() for r in t.regions], t.channel_in_seg)
        else:
            seg = ops.downsample_for_deep_supervision(seg, t.ds_scales)
        return img, seg


class GPUAugmentation:
    """nnU-Net's training transforms as batched steps on the device of the batch.

    Call with ``data (B, C, *initial_patch)`` float32 and ``target (B, Cs, *initial_patch)``
    integer on the training device; returns ``(data (B, C, *patch), target)``.
    ``label_values``: the labels the targets may hold (nnU-Net's ``all_labels`` plus the
    ignore label; the loader's padding -1 needs no entry).
    """

    def __init__(self, steps: Sequence[Step], label_values: Sequence[int]):
        self.steps = list(steps)
        self.label_values = sorted(int(v) for v in label_values)
        self._checked = False

    @classmethod
    def from_nnunet(cls, transforms, label_values: Sequence[int], dim: int,
                    validation: bool = False) -> "GPUAugmentation":
        """Translate nnU-Net's ``ComposeTransforms`` (``dim``: 2 or 3 spatial axes of the patch).

        A training pipeline needs its SpatialTransform (it cuts the final patch);
        ``validation=True`` takes nnU-Net's validation transforms (label removal, regions,
        deep-supervision targets: deterministic), whose patch the loader cuts."""
        if not isinstance(transforms, ComposeTransforms):
            raise UnsupportedTransform(f"expected nnU-Net's ComposeTransforms, got {type(transforms).__name__}")
        todo, steps = list(transforms.transforms), []
        while todo:
            t = todo.pop(0)
            p = 1.0
            if isinstance(t, RandomTransform):
                t, p = t.transform, t.apply_probability
            if isinstance(t, Convert3DTo2DTransform):
                if len(todo) < 2 or not isinstance(todo[0], SpatialTransform) \
                        or not isinstance(todo[1], Convert2DTo3DTransform):
                    raise UnsupportedTransform("Convert3DTo2DTransform not followed by SpatialTransform "
                                               "and Convert2DTo3DTransform")
                steps.append(SpatialStep(todo.pop(0), True, label_values))
                todo.pop(0)
            elif isinstance(t, SpatialTransform) and p == 1:
                steps.append(SpatialStep(t, False, label_values))
            elif isinstance(t, RandomIntensityStep.KINDS):
                steps.append(RandomIntensityStep(t, p, dim))
            elif isinstance(t, MirrorTransform) and p == 1:
                steps.append(MirrorStep(t))
            elif isinstance(t, (MaskImageTransform, RemoveLabelTransform, ConvertSegmentationToRegionsTransform,
                                DownsampleSegForDSTransform)) and p == 1:
                steps.append(LabelStep(t))
            else:
                raise UnsupportedTransform(f"{type(t).__name__} (probability {p}) has no batched version")
        if validation and any(not isinstance(s, LabelStep) for s in steps):
            raise UnsupportedTransform("validation transforms with random steps")
        if not validation and not any(isinstance(s, SpatialStep) for s in steps):
            raise UnsupportedTransform("the pipeline has no SpatialTransform to cut the final patch")
        return cls(steps, label_values)

    @property
    def spatial_step(self) -> Optional[SpatialStep]:
        """The rotation/scaling step (None in a validation pipeline)."""
        return next((s for s in self.steps if isinstance(s, SpatialStep)), None)

    def sample(self, n_samples: int, n_channels: int, spatial: Optional[dict] = None) -> list:
        """Parameters of every step for one batch (host side, nnU-Net's random draws);
        ``spatial``: the spatial step's parameters when they were drawn already (by the loader)."""
        return [spatial if spatial is not None and isinstance(s, SpatialStep) else s.sample(n_samples, n_channels)
                for s in self.steps]

    def _check_labels(self, seg: torch.Tensor):
        present = set(torch.unique(seg).tolist()) - {-1}
        unknown = present - set(self.label_values)
        if unknown:
            raise ValueError(f"GPU augmentation: the training targets hold labels {sorted(unknown)} that "
                             f"dataset.json does not declare ({self.label_values}). Fix dataset.json's "
                             "'labels' or turn the GPU path off with NNUNET_MAMBA_GPU_AUGMENTATION=0.")
        self._checked = True

    @torch.no_grad()
    def __call__(self, data: torch.Tensor, target: torch.Tensor, params: Optional[list] = None,
                 spatial: Optional[dict] = None):
        """``spatial``: the spatial step's parameters drawn by :class:`CroppingLoader` (which
        then cut the input to what they read); the other steps draw theirs here."""
        if not self._checked:
            self._check_labels(target)
        params = self.sample(data.shape[0], data.shape[1], spatial) if params is None else params
        img = data.float().contiguous()
        seg = target.to(torch.int16).contiguous() if target.dtype == torch.int8 else target.contiguous()
        for step, prm in zip(self.steps, params):
            img, seg = step.apply(img, seg, prm)
        return img.contiguous(), seg


def benchmark(patch=(128, 160, 112), channels: int = 4, batch: int = 2, labels=(0, 1, 2, 3),
              iterations: int = 50, device: str = "cuda") -> dict:
    """Time nnU-Net's 3D pipeline (BraTS-like: regions, mask, deep supervision) per batch on
    ``device``; the batches are random crops of nnU-Net's enlarged initial patch."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    import time

    rot = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
    ds = [[1.0] * 3] + [[0.5 ** i] * 3 for i in range(1, 4)]
    cpu = nnUNetTrainer.get_training_transforms(
        patch, rot, ds, (0, 1, 2), False, use_mask_for_norm=[True] * channels, is_cascaded=False,
        foreground_labels=list(labels[1:]), regions=[tuple(labels[1:]), tuple(labels[2:]), (labels[-1],)])
    aug = GPUAugmentation.from_nnunet(cpu, labels, 3)
    initial = tuple(int(i) for i in get_patch_size(patch, rot, rot, rot, (0.85, 1.25)))
    dev = torch.device(device)
    data = torch.randn((batch, channels, *initial), device=dev)
    seg = torch.randint(-1, len(labels), (batch, 1, *initial), device=dev, dtype=torch.int16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        aug(data.clone(), seg.clone())
    sync()
    t0 = time.perf_counter()
    for _ in range(iterations):
        aug(data.clone(), seg.clone())
    sync()
    ms = (time.perf_counter() - t0) / iterations * 1e3
    return {"patch": patch, "initial_patch": initial, "batch": batch, "channels": channels,
            "ms_per_batch": ms, "device": str(dev)}


if __name__ == "__main__":  # python -m nnunet_mamba.training.gpu_augmentation [cuda|cpu]
    import sys
    print(benchmark(device=sys.argv[1] if len(sys.argv) > 1 else "cuda"))
