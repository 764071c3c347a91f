"""Synthetic landmark data sets (for tests, demos and checking an installation).

Each case is a noisy volume with an oblique direction and anisotropic spacing, holding
three blobs at random, well separated positions; the landmarks are the blob centres in
world mm. The blobs differ so a network can tell them apart: ``bright`` (small, +),
``dark`` (small, -) and ``wide`` (large, +). The intensities are computed from the world
distance to the landmark, so the ground truth is exact whatever the geometry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from .augment import rotation_matrix
from .geometry import index_to_world
from .io import write_landmarks

#: name -> (amplitude, radius in mm) of the blob that marks the landmark
SYNTH_BLOBS = {"bright": (3.0, 1.5), "dark": (-3.0, 1.5), "wide": (1.0, 3.0)}


def synthesize_case(rng: np.random.Generator, size: Sequence[int] = (32, 32, 24),
                    extent_mm: float = 32.0, max_tilt_deg: float = 20.0,
                    min_separation_mm: float = 8.0, noise: float = 0.25
                    ) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    """(float32 image of ``size`` (x, y, z) voxels over a ``extent_mm`` cube, landmarks)."""
    size = np.asarray([int(s) for s in size])
    spacing = extent_mm / size
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in rng.uniform(-100, 100, 3)])
    rot = rotation_matrix(np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg, 3)))
    image.SetDirection([float(v) for v in rot.ravel()])
    # landmarks: continuous indices in the central 70 % of the volume, well separated
    for _ in range(1000):
        idx = rng.uniform(0.15, 0.85, (len(SYNTH_BLOBS), 3)) * (size - 1)
        mm = idx * spacing
        d = np.linalg.norm(mm[:, None] - mm[None], axis=-1)
        if np.all(d[np.triu_indices(len(idx), 1)] >= min_separation_mm):
            break
    else:
        raise RuntimeError("could not place the landmarks; use a larger volume")
    world = index_to_world(image, idx)
    # world point of every voxel: origin + direction @ (spacing * index), array order (z, y, x)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    index = np.stack([xx, yy, zz], axis=-1).astype(np.float64)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    vox_world = (index * spacing) @ direction.T + np.asarray(image.GetOrigin())
    array = rng.normal(0.0, noise, tuple(size[::-1]))
    for (amp, radius), p in zip(SYNTH_BLOBS.values(), world):
        r2 = ((vox_world - p) ** 2).sum(-1)
        array += amp * np.exp(-r2 / (2 * radius ** 2))
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.CopyInformation(image)
    return out, dict(zip(SYNTH_BLOBS, world))


def synthesize_dataset(out_dir, cases: int, size: Sequence[int] = (32, 32, 24), seed: int = 0,
                       overwrite: bool = False) -> list[str]:
    """Write ``cases`` synthetic cases in the landmark dataset layout; returns the case ids."""
    out_dir = Path(out_dir)
    img_dir, lm_dir = out_dir / "images", out_dir / "landmarks"
    if not overwrite and (img_dir.exists() or lm_dir.exists()):
        raise UserError(f"{out_dir} already holds images/ or landmarks/; choose another folder "
                        "or pass --overwrite.")
    img_dir.mkdir(parents=True, exist_ok=True)
    lm_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(cases):
        case = f"case_{i:03d}"
        image, marks = synthesize_case(rng, size)
        sitk.WriteImage(image, str(img_dir / f"{case}.nii.gz"))
        write_landmarks(lm_dir / f"{case}.json", marks)
        ids.append(case)
    return ids
