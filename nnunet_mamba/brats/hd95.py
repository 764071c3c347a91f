"""HD95 as each benchmark computes it (issue 15): three definitions that differ on real cases.

All take two non-empty boolean masks given as (z, y, x) arrays and the voxel size along the
array axes (SimpleITK's spacing reversed), and return millimetres. Empty masks are not a
distance question: the conventions in :mod:`.metrics` give the values there.

- ``surface-weighted`` (BraTS 2023, legacy and lesion-wise; DeepMind ``surface-distance``
  ``compute_robust_hausdorff(compute_surface_distances(...), 95)``): the surface is made of
  surface elements on the grid of 2x2x2 voxel cubes (the cubes of mixed occupancy, i.e. the
  voxel-corner grid, half a voxel off the voxel centres); each element has an area in mm^2
  from the marching-cubes normals of its neighbour code. For each direction the distances of
  one surface's elements to the other surface (a Euclidean distance transform in mm) are
  sorted and the first distance whose cumulative area share reaches 95 % is taken; the
  result is the larger of the two directions. The neighbour-code normals are MONAI's copy
  of DeepMind's table (``monai.metrics.utils``), the areas are computed from them in float64
  as DeepMind does; the rest is written here with NumPy / SciPy because DeepMind's package
  no longer runs on NumPy 2 (``np.Inf``, ``scipy.ndimage.morphology``).
- ``pooled`` (nnU-Net v1's BraTS script and SegMamba's ``5_compute_metrics.py``, both
  ``medpy.metric.binary.hd95``): edge voxels are the mask minus its erosion by the
  6-neighbourhood (``generate_binary_structure(3, 1)``; voxels on the image border are edge
  voxels); the distances of each edge set to the other (distance transform in mm) are
  pooled into one set and its 95th percentile (NumPy's linear interpolation) is taken.
  Written here in SciPy (the same operations as medpy 0.5.2, without its import cost and
  its C++ build); the tests compare it with medpy where medpy is installed.
- ``monai`` (what ``evaluate`` reported before issue 15): MONAI's
  ``compute_hausdorff_distance(percentile=95, spacing=...)``, the larger of the two
  directed 95th percentiles of the same edge-voxel distances.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from scipy import ndimage

HD95_DEFINITIONS = {
    "surface-weighted": (
        "surface-element-weighted robust Hausdorff (DeepMind surface-distance compute_robust_hausdorff(.., 95), the "
        "BraTS 2023 definition): surface elements on the 2x2x2-cube grid weighted by their area in mm^2, per "
        "direction the first distance whose cumulative area share reaches 95%, the larger direction; "
        "neighbour-code normals from MONAI's copy of DeepMind's table, the rest NumPy/SciPy (nnunet_mamba.brats.hd95)"),
    "pooled": (
        "pooled 95th percentile (medpy.metric.binary.hd95): edge voxels = mask minus its 6-neighbourhood erosion, "
        "the distances of both directions pooled, np.percentile(.., 95); SciPy (nnunet_mamba.brats.hd95)"),
    "monai": (
        "MONAI monai.metrics.compute_hausdorff_distance(percentile=95): the larger of the two directed 95th "
        "percentiles of the edge-voxel distances (edge = mask minus its 6-neighbourhood erosion)"),
}


def _check(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple:
    if pred.shape != ref.shape or len(spacing) != pred.ndim or pred.ndim != 3:
        raise ValueError(f"masks {pred.shape} / {ref.shape} and spacing {tuple(spacing)} do not match (3D)")
    if not pred.any() or not ref.any():
        raise ValueError("hd95 needs two non-empty masks; empty masks are handled by the conventions")
    return tuple(float(s) for s in spacing)


def _union_box(pred: np.ndarray, ref: np.ndarray, margin: int) -> tuple:
    """Slices of the bounding box of ``pred | ref`` widened by ``margin`` voxels (within the image)."""
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, pred.shape))


# ----------------------------------------------------------------------------- surface-weighted (DeepMind)

@lru_cache(maxsize=32)
def _area_table(spacing: tuple) -> tuple:
    """(area of every neighbour code in mm^2 as float64 [256], code weight of each cube corner [2, 2, 2])."""
    from monai.metrics import utils as mu

    kernel = np.asarray(mu.get_code_to_measure_table(spacing)[1]).reshape(2, 2, 2)
    try:  # the marching-cubes normals (multiples of 1/8: exact in float32); areas in float64 as DeepMind
        normals = np.asarray(mu._get_neighbour_code_to_normals_table(), dtype=np.float64)  # [256, 4, 3]
    except AttributeError:  # a MONAI without the private table: its public float32 areas
        return np.asarray(mu.get_code_to_measure_table(spacing)[0], dtype=np.float64), kernel
    scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
    return np.linalg.norm(normals * scale, axis=-1).sum(-1), kernel


def _surface_elements(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Neighbour code of every 2x2x2 cube of ``mask`` padded by one zero voxel on each side."""
    x = np.pad(mask, 1).astype(np.uint8)
    n = tuple(s - 1 for s in x.shape)
    code = np.zeros(n, np.uint8)
    for (i, j, k), w in np.ndenumerate(kernel):
        code += x[i:i + n[0], j:j + n[1], k:k + n[2]] * np.uint8(w)
    return code


def _weighted_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    order = np.lexsort((areas, distances))  # by distance, ties by area (DeepMind sorts (distance, area) pairs)
    distances, areas = distances[order], areas[order]
    cumulative = np.cumsum(areas) / np.sum(areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[min(index, len(distances) - 1)])


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """Surface elements of both masks: ``{"pred_to_ref", "ref_to_pred"}`` distances (mm) and areas (mm^2)."""
    spacing = _check(pred, ref, spacing)
    box = _union_box(pred, ref, 0)
    areas_of, kernel = _area_table(spacing)
    code_p, code_r = (_surface_elements(m[box], kernel) for m in (pred, ref))
    border_p, border_r = (code_p != 0) & (code_p != 255), (code_r != 0) & (code_r != 255)
    dist_to_p = ndimage.distance_transform_edt(~border_p, sampling=spacing)
    dist_to_r = ndimage.distance_transform_edt(~border_r, sampling=spacing)
    return {"pred_to_ref": dist_to_r[border_p], "ref_to_pred": dist_to_p[border_r],
            "pred_areas": areas_of[code_p[border_p]], "ref_areas": areas_of[code_r[border_r]]}


def hd95_surface_weighted(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """BraTS 2023 / DeepMind robust Hausdorff at 95 % (surface elements weighted by area), in mm."""
    d = surface_distances(pred, ref, spacing)
    return max(_weighted_percentile(d["pred_to_ref"], d["pred_areas"], 95.0),
               _weighted_percentile(d["ref_to_pred"], d["ref_areas"], 95.0))


# ----------------------------------------------------------------------------- pooled (medpy)

def _edge_distances(pred: np.ndarray, ref: np.ndarray, spacing: tuple) -> tuple:
    """Distances (mm) of pred's edge voxels to ref's edge voxels and back (6-neighbourhood erosion edges)."""
    box = _union_box(pred, ref, 1)
    p, r = pred[box], ref[box]
    structure = ndimage.generate_binary_structure(3, 1)
    edge_p = p ^ ndimage.binary_erosion(p, structure=structure)
    edge_r = r ^ ndimage.binary_erosion(r, structure=structure)
    d_pr = ndimage.distance_transform_edt(~edge_r, sampling=spacing)[edge_p]
    d_rp = ndimage.distance_transform_edt(~edge_p, sampling=spacing)[edge_r]
    return d_pr, d_rp


def hd95_pooled(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """medpy's ``hd95``: 95th percentile of both directions' edge-voxel distances pooled, in mm."""
    spacing = _check(pred, ref, spacing)
    d_pr, d_rp = _edge_distances(pred, ref, spacing)
    return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))


# ----------------------------------------------------------------------------- MONAI

def hd95_monai(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """MONAI's ``compute_hausdorff_distance(percentile=95)``: max of the two directed 95th percentiles, in mm."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    spacing = _check(pred, ref, spacing)
    with warnings.catch_warnings():  # MONAI warns about its own use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(torch.from_numpy(np.ascontiguousarray(pred))[None, None],
                                           torch.from_numpy(np.ascontiguousarray(ref))[None, None],
                                           include_background=True, percentile=95, spacing=list(spacing))
    value = float(value.reshape(-1)[0])
    if not np.isfinite(value):
        raise RuntimeError(f"MONAI returned HD95 = {value} for two non-empty masks")
    return value


HD95_FUNCTIONS = {"surface-weighted": hd95_surface_weighted, "pooled": hd95_pooled, "monai": hd95_monai}


def hd95(pred: np.ndarray, ref: np.ndarray, spacing, definition: str = "surface-weighted") -> float:
    """HD95 (mm) of two non-empty boolean (z, y, x) masks by one of :data:`HD95_DEFINITIONS`."""
    try:
        function = HD95_FUNCTIONS[definition]
    except KeyError:
        raise ValueError(f"unknown HD95 definition {definition!r}; choose from {', '.join(HD95_FUNCTIONS)}") from None
    return function(np.asarray(pred, bool), np.asarray(ref, bool), spacing)
