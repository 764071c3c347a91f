"""Gaussian heatmap targets and their decoding to sub-voxel landmark positions.

Coordinates are array coordinates (z, y, x) = (D, H, W) voxel indices, voxel centres at
integers (see :mod:`nnunet_mamba.landmarks.geometry`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def gaussian_heatmaps(coords: torch.Tensor, shape: Sequence[int], sigma: float) -> torch.Tensor:
    """Unnormalised Gaussians ``exp(-|p - c|^2 / (2 sigma^2))`` (peak 1 at the landmark).

    ``coords`` (..., K, 3) array coordinates; ``shape`` (D, H, W); ``sigma`` in voxels.
    Returns (..., K, D, H, W) in ``coords``' dtype and device (separable product of three
    1D Gaussians, so a landmark near a border gives a truncated peak, never a shifted one).
    """
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    coords = torch.as_tensor(coords)
    if not coords.is_floating_point():
        coords = coords.float()
    out = None
    for axis, n in enumerate(shape):
        grid = torch.arange(int(n), device=coords.device, dtype=coords.dtype)
        g = torch.exp(-(grid - coords[..., axis, None]) ** 2 / (2.0 * sigma ** 2))
        g = g.reshape(*g.shape[:-1], *([1] * axis), int(n), *([1] * (len(shape) - 1 - axis)))
        out = g if out is None else out * g
    return out


def decode_heatmaps(heatmaps: torch.Tensor, radius: int = 3,
                    sharpen: Optional[float] = None, sigma: Optional[float] = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Landmark positions from heatmaps: argmax, refined by a local soft-argmax.

    ``heatmaps`` (..., K, D, H, W). For each map: the arg-max voxel; in the window of
    ``radius`` voxels around it (clipped at the borders) the weighted centre of mass with
    weights ``max(h / h_peak, 0) ** sharpen``. A plain centre of mass of a broad peak in a
    small window is pulled to the window centre (for sigma 5 and radius 3 it recovers only
    ~15 % of the sub-voxel offset); raising the normalised peak to the power
    ``sharpen = sigma ** 2`` turns a Gaussian of width ``sigma`` into one of width 1 voxel,
    whose centre of mass in the window is unbiased to ~0.01 voxel. Give ``sigma`` (the
    training sigma) or ``sharpen`` (1 = plain soft-argmax). In the outermost voxels of the
    volume the window is one-sided and the estimate is pulled inwards (by < 0.5 voxel).

    Returns coordinates (..., K, 3) in (z, y, x) voxel units (float64) and the peak values
    (..., K) as confidence. A map whose peak is <= 0 is decoded to its arg-max voxel.
    """
    if sharpen is None:
        sharpen = float(sigma) ** 2 if sigma is not None else 1.0
    lead, spatial = heatmaps.shape[:-3], tuple(heatmaps.shape[-3:])
    maps = heatmaps.detach().reshape(-1, *spatial)
    flat_idx = maps.flatten(1).argmax(dim=1)
    peaks = maps.flatten(1).gather(1, flat_idx[:, None])[:, 0]
    centres = np.stack(np.unravel_index(flat_idx.cpu().numpy(), spatial), axis=1)
    coords = centres.astype(np.float64)
    peaks_np = peaks.double().cpu().numpy()
    for i, (c, peak) in enumerate(zip(centres, peaks_np)):
        if not peak > 0:
            continue
        lo = np.maximum(c - radius, 0)
        hi = np.minimum(c + radius + 1, spatial)
        win = maps[i, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].double().cpu().numpy()
        w = np.clip(win / peak, 0.0, None) ** sharpen
        total = w.sum()
        if not total > 0:
            continue
        for axis in range(3):
            pos = np.arange(lo[axis], hi[axis], dtype=np.float64)
            profile = w.sum(axis=tuple(a for a in range(3) if a != axis))
            coords[i, axis] = float((profile * pos).sum() / total)
    return coords.reshape(*lead, 3), peaks_np.reshape(*lead)
