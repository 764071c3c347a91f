"""Reading, checking and resampling landmark cases onto the working grid.

Each volume is resampled once onto its :class:`~.geometry.WorkingGrid` (the paper's resize
to 128^3), z-score normalised, and kept in memory as float32; its landmarks are converted
from world mm to working-grid array coordinates through the grid's geometry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .. import imaging
from ..errors import UserError
from ..imaging import ImageError
from .geometry import (WorkingGrid, geometry_of, image_extent_text, inside_image,
                       world_to_index)
from .io import check_landmark_names, discover_dataset, read_landmarks


@dataclass
class PreparedCase:
    """A case on its working grid.

    ``image`` (D, H, W) float32, z-scored; ``grid`` the resampling record; ``coords``
    (K, 3) landmark array coordinates (z, y, x) on the grid and ``world`` (K, 3) the
    reference world points in mm (both None for cases without landmarks).
    """

    case_id: str
    image: np.ndarray
    grid: WorkingGrid
    coords: Optional[np.ndarray] = None
    world: Optional[np.ndarray] = None
    source: Optional[Path] = None


def _case_error(case_id: str, e: ImageError) -> UserError:
    return UserError(f"case {case_id!r}: {e}")


def read_image_header(path, case_id: str) -> tuple[sitk.Image, tuple[int, int, int]]:
    """(geometry probe, size) of a 3D scalar image file, without reading its voxels."""
    try:
        reader = imaging.read_header(path)
    except ImageError as e:
        raise _case_error(case_id, e) from None
    return geometry_of(reader)


def read_image(path, case_id: str) -> sitk.Image:
    """A 3D scalar image read by :func:`nnunet_mamba.imaging.read_image` (truncated files and
    NaN/inf voxels refused), or a :class:`UserError` naming the case, the file and the fix."""
    try:
        return imaging.read_image(path)
    except ImageError as e:
        raise _case_error(case_id, e) from None


def normalise(array: np.ndarray) -> np.ndarray:
    """Z-score over the whole volume (a constant volume becomes zeros)."""
    array = array.astype(np.float32, copy=False)
    std = float(array.std())
    return ((array - float(array.mean())) / max(std, 1e-6)).astype(np.float32)


def to_working_grid(image: sitk.Image, size: Sequence[int], antialias: bool = True
                    ) -> tuple[np.ndarray, WorkingGrid]:
    """(normalised (D, H, W) array, grid) for ``image`` resized to ``size`` (x, y, z)."""
    grid = WorkingGrid.covering(image, size)
    resampled = grid.resample(image, antialias=antialias)
    return normalise(sitk.GetArrayFromImage(resampled)), grid


def check_inside(probe: sitk.Image, size: Sequence[int], marks: dict, case_id: str, image_path,
                 lm_path) -> np.ndarray:
    """Continuous indices (K, 3) of the landmarks in the image of geometry ``probe`` and
    ``size`` (see :func:`~.geometry.geometry_of`); UserError if one lies outside it."""
    world = np.stack(list(marks.values()))
    idx = world_to_index(probe, world)
    inside = inside_image(size, idx)
    if not inside.all():
        bad = [n for n, ok in zip(marks, inside) if not ok]
        n = bad[0]
        p = marks[n]
        raise UserError(
            f"case {case_id!r}: landmark {n!r} at ({p[0]:.2f}, {p[1]:.2f}, {p[2]:.2f}) mm in "
            f"{lm_path} lies outside the image {image_path} ({image_extent_text(probe, size)})"
            + (f"; also outside: {', '.join(bad[1:])}" if len(bad) > 1 else "")
            + ". Landmarks must be world coordinates in mm in the image's frame (ITK/LPS): "
              "if they are voxel indices, convert them with the image geometry; if they are "
              'RAS (3D Slicer), add "coordinate_system": "RAS" to the JSON file; otherwise '
              "correct or remove the landmark.")
    return idx


def load_training_cases(data_dir, size: Sequence[int], antialias: bool = True,
                        names: Optional[Sequence[str]] = None, log=print
                        ) -> tuple[list[str], list[PreparedCase]]:
    """Check every case of the dataset folder first, then resample them all.

    Returns the landmark names (order of the first case, or ``names``) and the cases.
    """
    cases = discover_dataset(data_dir)
    marks = {c.case_id: read_landmarks(c.landmarks) for c in cases}
    names = check_landmark_names(marks, expected=names,
                                 files={c.case_id: c.landmarks for c in cases},
                                 expected_from="the given landmark names")
    for c in cases:  # all checks on the headers, before the (slow) reading and resampling
        probe, img_size = read_image_header(c.image, c.case_id)
        check_inside(probe, img_size, marks[c.case_id], c.case_id, c.image, c.landmarks)
    prepared = []
    for i, c in enumerate(cases):
        image = read_image(c.image, c.case_id)
        array, grid = to_working_grid(image, size, antialias)
        world = np.stack([marks[c.case_id][n] for n in names])
        prepared.append(PreparedCase(c.case_id, array, grid, grid.world_to_array(world), world,
                                     c.image))
        if log is not None and (i + 1) % 20 == 0:
            log(f"resampled {i + 1}/{len(cases)} cases")
    return names, prepared
