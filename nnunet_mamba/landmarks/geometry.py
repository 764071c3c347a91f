"""World <-> voxel coordinates and the working grid the networks see.

Coordinate conventions used throughout :mod:`nnunet_mamba.landmarks`:

* **world**: physical points in mm in the image's own world frame, as SimpleITK reports
  them (``origin + direction @ (spacing * index)``; LPS for NIfTI/DICOM read by ITK).
* **index**: SimpleITK continuous index (x, y, z): voxel centres at integers.
* **array**: the same continuous index in numpy/torch axis order (z, y, x), i.e. the
  (D, H, W) axes of ``sitk.GetArrayFromImage`` and of the network tensors.

Every conversion goes through SimpleITK's geometry (origin, spacing, direction), so
oblique and anisotropic images are handled exactly.

The paper resizes every volume to 128^3 (Sec. 3.4; field facts). :class:`WorkingGrid` is
that resize done as a SimpleITK resampling: a grid with the image's origin corner,
direction and physical extent but ``size`` voxels, so a landmark's working-grid
coordinates follow from its world position exactly, and decoded positions map back to
world mm exactly. The grid is stored per case (``to_dict``) as the record of the resize.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk


def world_to_index(image: sitk.Image, points) -> np.ndarray:
    """World points (N, 3) in mm -> continuous SimpleITK indices (N, 3), (x, y, z) order."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p)))
                     for p in pts], dtype=np.float64).reshape(-1, 3)


def index_to_world(image: sitk.Image, indices) -> np.ndarray:
    """Continuous SimpleITK indices (N, 3), (x, y, z) order -> world points (N, 3) in mm."""
    idx = np.asarray(indices, dtype=np.float64).reshape(-1, 3)
    return np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i)))
                     for i in idx], dtype=np.float64).reshape(-1, 3)


def index_to_array(indices) -> np.ndarray:
    """(x, y, z) continuous indices -> (z, y, x) array coordinates (and back: same flip)."""
    return np.asarray(indices, dtype=np.float64)[..., ::-1].copy()


array_to_index = index_to_array


def inside_image(size: Sequence[int], indices, margin: float = 0.5) -> np.ndarray:
    """(N,) bool: the continuous indices lie within an image of ``size`` (x, y, z) voxels
    (voxel centres +- ``margin``)."""
    idx = np.asarray(indices, dtype=np.float64).reshape(-1, 3)
    size = np.asarray(size, dtype=np.float64)
    return np.all((idx >= -margin) & (idx <= size - 1 + margin), axis=1)


def geometry_of(image_or_reader) -> tuple[sitk.Image, tuple[int, int, int]]:
    """(a 1-voxel image with the same origin, spacing and direction, the size (x, y, z)).

    Takes an image or an ``sitk.ImageFileReader`` after ``ReadImageInformation()``, so the
    geometry of a file can be checked without reading its voxels.
    """
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetOrigin(image_or_reader.GetOrigin())
    probe.SetSpacing(image_or_reader.GetSpacing())
    probe.SetDirection(image_or_reader.GetDirection())
    return probe, tuple(int(s) for s in image_or_reader.GetSize())


def image_extent_text(image: sitk.Image, size: Optional[Sequence[int]] = None) -> str:
    """Human-readable geometry of an image (or probe + size) for error messages."""
    size = tuple(image.GetSize()) if size is None else tuple(size)
    corners = index_to_world(image, [(-0.5, -0.5, -0.5), np.asarray(size) - 0.5])
    fmt = lambda v: "(" + ", ".join(f"{x:.1f}" for x in v) + ")"  # noqa: E731
    return (f"size {size}, spacing {fmt(image.GetSpacing())} mm, origin "
            f"{fmt(image.GetOrigin())}, world corners {fmt(corners[0])} .. {fmt(corners[1])}")


@dataclass(frozen=True)
class WorkingGrid:
    """A resampling grid of ``size`` voxels covering an image's physical extent.

    ``size``, ``spacing`` and ``origin`` are in SimpleITK (x, y, z) order; ``direction`` is
    the row-major 3x3 matrix of the source image. Made by :meth:`covering`: voxel
    ``j`` of the grid sits where continuous index ``(j + 0.5) * n / size - 0.5`` of the
    source image sits (the standard "resize" mapping, voxel corners to voxel corners).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def covering(cls, image: sitk.Image, size: Sequence[int]) -> "WorkingGrid":
        """The grid of ``size`` (x, y, z) voxels over ``image``'s extent and orientation."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        old_size = np.asarray(image.GetSize(), dtype=np.float64)
        old_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        new_size = np.asarray([int(s) for s in size], dtype=np.float64)
        new_spacing = old_spacing * old_size / new_size
        # grid voxel 0 centre = source continuous index 0.5 * n / size - 0.5 per axis
        first = 0.5 * old_size / new_size - 0.5
        origin = image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, first)))
        return cls(tuple(int(s) for s in size), tuple(map(float, new_spacing)),
                   tuple(map(float, origin)), tuple(map(float, image.GetDirection())))

    def reference_image(self) -> sitk.Image:
        """An empty float32 image with this grid's geometry (for ``sitk.Resample``)."""
        ref = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref

    def resample(self, image: sitk.Image, antialias: bool = True,
                 interpolator=sitk.sitkLinear, default_value: float = 0.0) -> sitk.Image:
        """``image`` (float32) resampled onto this grid.

        With ``antialias``, axes that shrink by a factor f > 1 are first smoothed with a
        Gaussian of sigma (f - 1) / 2 source voxels (as skimage's resize does).
        """
        image = sitk.Cast(image, sitk.sitkFloat32)
        if antialias:
            factor = np.asarray(self.spacing) / np.asarray(image.GetSpacing())
            sigma_vox = np.maximum(0.0, (factor - 1.0) / 2.0)
            if np.any(sigma_vox > 0):
                variance = (sigma_vox * np.asarray(image.GetSpacing())) ** 2
                image = sitk.DiscreteGaussian(image, variance=[float(v) for v in variance],
                                              maximumKernelWidth=64, useImageSpacing=True)
        return sitk.Resample(image, self.reference_image(), sitk.Transform(), interpolator,
                             float(default_value), sitk.sitkFloat32)

    def _probe(self) -> sitk.Image:
        """A 1-voxel image with this grid's origin, spacing and direction."""
        probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        probe.SetSpacing(self.spacing)
        probe.SetOrigin(self.origin)
        probe.SetDirection(self.direction)
        return probe

    def world_to_array(self, points) -> np.ndarray:
        """World points (N, 3) mm -> grid array coordinates (N, 3) in (z, y, x) order."""
        return index_to_array(world_to_index(self._probe(), points))

    def array_to_world(self, coords) -> np.ndarray:
        """Grid array coordinates (N, 3) in (z, y, x) order -> world points (N, 3) mm."""
        return index_to_world(self._probe(), array_to_index(coords))

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "WorkingGrid":
        return cls(tuple(int(s) for s in d["size"]), tuple(map(float, d["spacing"])),
                   tuple(map(float, d["origin"])), tuple(map(float, d["direction"])))
