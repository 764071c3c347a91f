"""Training augmentation for classification from nnU-Net's own transforms (batchgeneratorsv2).

Mild on purpose (a label must survive it): random mirroring, a small rotation and
isotropic scaling (no elastic deformation, no cropping: the whole preprocessed volume is
kept), and a small multiplicative / additive intensity jitter. Applied per case to a
(C, z, y, x) tensor.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class ClassificationAugmentation:
    """Callable (C, z, y, x) tensor -> augmented tensor of the same shape.

    Each part is applied with probability ``p``: rotation by up to ``rotation_deg`` degrees
    about each axis, isotropic scaling in ``scaling``; mirroring along each of
    ``mirror_axes`` (0, 1, 2 = z, y, x) with probability 1/2; intensity multiplied by a
    factor in ``brightness`` and shifted by N(0, ``shift_sigma``) per channel.
    """

    def __init__(self, patch_size: Sequence[int], rotation_deg: float = 10.0,
                 scaling: tuple[float, float] = (0.9, 1.1),
                 mirror_axes: Sequence[int] = (0, 1, 2),
                 brightness: tuple[float, float] = (0.9, 1.1), shift_sigma: float = 0.1,
                 p: float = 0.3):
        from batchgeneratorsv2.transforms.intensity.brightness import (
            BrightnessAdditiveTransform, MultiplicativeBrightnessTransform)
        from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
        from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
        from batchgeneratorsv2.transforms.utils.random import RandomTransform

        rot = math.radians(rotation_deg)
        transforms = [
            SpatialTransform(tuple(patch_size), patch_center_dist_from_border=0,
                             random_crop=False, p_elastic_deform=0, p_rotation=p,
                             rotation=(-rot, rot), p_scaling=p, scaling=tuple(scaling),
                             p_synchronize_scaling_across_axes=1),
        ]
        if mirror_axes:
            transforms.append(MirrorTransform(allowed_axes=tuple(mirror_axes)))
        transforms += [
            RandomTransform(MultiplicativeBrightnessTransform(
                multiplier_range=tuple(brightness), synchronize_channels=False), p),
            RandomTransform(BrightnessAdditiveTransform(
                mu=0.0, sigma=shift_sigma, synchronize_channels=False), p),
        ]
        self.transform = ComposeTransforms(transforms)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image=image)["image"]
