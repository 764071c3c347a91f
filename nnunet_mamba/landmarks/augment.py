"""Training augmentation that moves the landmarks with the image.

One random voxel-space affine per sample (small rotation, isotropic scaling, translation)
is applied to the image by ``grid_sample`` and to the landmark coordinates by the inverse
map, so image and targets stay exactly consistent; intensity jitter (scale, shift, noise)
changes the image only. Mirroring is used only when the user declares left/right landmark
pairs: a mirrored left structure looks like a right one, so the two names swap. Without
pairs there are no flips (a flip would teach the network mirrored anatomy under the wrong
names).

Everything runs batched on the training device; coordinates are array coordinates
(z, y, x) in voxels of the working grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: --flip-axis name (SimpleITK index axis) -> array axis of the (D, H, W) tensors
FLIP_AXES = {"x": 2, "y": 1, "z": 0}


@dataclass
class AugmentationConfig:
    """Ranges of the random transforms (0 switches one off).

    ``rotation_deg``: each of the three axis rotations uniform in +-rotation_deg;
    ``scale``: isotropic zoom uniform in 1 +- scale; ``translation``: shift uniform in
    +-translation x size per axis; ``affine_prob``: chance of an affine per sample;
    ``flip_pairs``: (left, right) landmark names swapped by a mirror along ``flip_axis``
    ('x', 'y' or 'z' of the image index), applied with ``flip_prob``;
    ``intensity_scale`` / ``intensity_shift`` / ``noise_std``: x * (1 + U(+-s)) + U(+-b)
    + N(0, noise_std), on z-scored images.
    """

    rotation_deg: float = 10.0
    scale: float = 0.1
    translation: float = 0.05
    affine_prob: float = 0.8
    flip_pairs: Sequence[tuple[str, str]] = field(default_factory=tuple)
    flip_axis: str = "x"
    flip_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_std: float = 0.05

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["flip_pairs"] = [list(p) for p in self.flip_pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentationConfig":
        d = dict(d)
        d["flip_pairs"] = tuple(tuple(p) for p in d.get("flip_pairs", ()))
        return cls(**d)


def rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """R = Rz @ Ry @ Rx for rotations about the three array axes (3, 3)."""
    out = np.eye(3)
    for axis, a in enumerate(angles_rad):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def flip_permutation(names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Channel order after a mirror: position i takes the landmark that becomes name i."""
    index = {n: i for i, n in enumerate(names)}
    perm = list(range(len(names)))
    for a, b in pairs:
        if a not in index or b not in index:
            missing = [n for n in (a, b) if n not in index]
            raise ValueError(f"flip pair {a}:{b} names unknown landmark(s) {missing}")
        perm[index[a]], perm[index[b]] = index[b], index[a]
    return perm


def warp(images: torch.Tensor, matrices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Resample (B, C, D, H, W) at q = A p + t (array voxel coordinates, trilinear).

    ``matrices`` (B, 3, 3), ``offsets`` (B, 3) map output voxel p to input voxel q;
    outside the volume the border value is repeated.
    """
    B, _, D, H, W = images.shape
    dev, dt = images.device, images.dtype
    axes = [torch.arange(n, device=dev, dtype=dt) for n in (D, H, W)]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3)
    q = torch.einsum("bij,dhwj->bdhwi", matrices.to(dt), base) + offsets.to(dt)[:, None, None, None]
    size = torch.tensor([D, H, W], device=dev, dtype=dt)
    norm = 2.0 * q / (size - 1).clamp(min=1) - 1.0
    return F.grid_sample(images, norm.flip(-1), mode="bilinear", padding_mode="border",
                         align_corners=True)


class LandmarkAugmenter:
    """Random affine (+ optional paired flips) and intensity jitter for a batch.

    ``__call__(images (B, C, D, H, W), coords (B, K, 3))`` -> augmented images and the
    moved coordinates (K in the order of ``names``). An affine that would push a landmark
    out of the volume is redrawn (up to 10 times, then the identity is used).
    """

    def __init__(self, config: AugmentationConfig, names: Sequence[str], seed: int = 0):
        self.config = config
        self.names = list(names)
        self.rng = np.random.default_rng(seed)
        self.flip_perm = (flip_permutation(self.names, config.flip_pairs)
                          if config.flip_pairs else None)
        if config.flip_axis not in FLIP_AXES:
            raise ValueError(f"flip_axis must be one of {', '.join(FLIP_AXES)}")

    def _sample_affine(self, shape: np.ndarray, coords: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        cfg, rng = self.config, self.rng
        centre = (shape - 1) / 2.0
        if rng.random() >= cfg.affine_prob:
            return np.eye(3), np.zeros(3)
        for _ in range(10):
            rot = rotation_matrix(np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3)))
            a = rot * rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
            t = centre - a @ centre + rng.uniform(-cfg.translation, cfg.translation, 3) * shape
            moved = (coords - t) @ np.linalg.inv(a).T
            if np.all((moved >= 0) & (moved <= shape - 1)):
                return a, t
        return np.eye(3), np.zeros(3)

    def __call__(self, images: torch.Tensor, coords: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, rng = self.config, self.rng
        B = images.shape[0]
        shape = np.asarray(images.shape[2:], dtype=np.float64)
        coords_np = coords.detach().double().cpu().numpy()
        mats, offs, new_coords = [], [], []
        for b in range(B):
            a, t = self._sample_affine(shape, coords_np[b])
            c = coords_np[b]
            if self.flip_perm is not None and rng.random() < cfg.flip_prob:
                # mirror first: q = A (F p) + t with F p = p mirrored along the axis
                ax = FLIP_AXES[cfg.flip_axis]
                f_mat, f_off = np.eye(3), np.zeros(3)
                f_mat[ax, ax], f_off[ax] = -1.0, shape[ax] - 1
                a, t = a @ f_mat, a @ f_off + t
                c = c[self.flip_perm]
            mats.append(a)
            offs.append(t)
            new_coords.append((c - t) @ np.linalg.inv(a).T)
        mats_t = torch.as_tensor(np.stack(mats), device=images.device)
        offs_t = torch.as_tensor(np.stack(offs), device=images.device)
        identity = all(np.allclose(m, np.eye(3)) and np.allclose(o, 0) for m, o in zip(mats, offs))
        out = images if identity else warp(images, mats_t, offs_t)
        if cfg.intensity_scale or cfg.intensity_shift or cfg.noise_std:
            view = (B,) + (1,) * (images.dim() - 1)
            scale = torch.as_tensor(1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, B),
                                    device=images.device, dtype=images.dtype).view(view)
            shift = torch.as_tensor(rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, B),
                                    device=images.device, dtype=images.dtype).view(view)
            out = out * scale + shift
            if cfg.noise_std:
                gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2 ** 31)))
                noise = torch.randn(out.shape, generator=gen, dtype=out.dtype)
                out = out + cfg.noise_std * noise.to(out.device)
        coords_out = torch.as_tensor(np.stack(new_coords), dtype=coords.dtype, device=coords.device)
        return out, coords_out


def no_augmentation() -> AugmentationConfig:
    """A config that changes nothing (for tests and ablations)."""
    return AugmentationConfig(rotation_deg=0.0, scale=0.0, translation=0.0, affine_prob=0.0,
                              flip_pairs=(), intensity_scale=0.0, intensity_shift=0.0,
                              noise_std=0.0)


def parse_flip_pairs(items: Optional[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    """``["L_eye:R_eye", ...]`` -> (("L_eye", "R_eye"), ...); raises ValueError when malformed."""
    pairs = []
    for item in items or ():
        parts = [p.strip() for p in str(item).split(":")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise ValueError(f"flip pair {item!r} is not 'LEFT:RIGHT' with two different names")
        pairs.append((parts[0], parts[1]))
    used = [n for p in pairs for n in p]
    if len(used) != len(set(used)):
        raise ValueError("a landmark appears in more than one flip pair")
    return tuple(pairs)
