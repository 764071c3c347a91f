"""The one place where a feature map (3D, or 2D) becomes token sequences and back.

A :class:`ScanOrder` says how the voxels of a (B, C, D, H, W) map are read into a
(B, L, C) sequence, L = D*H*W:

* ``axes``: the order in which the spatial axes are flattened, slowest first.
  (0, 1, 2) is the ordinary raster order (W fastest); the six permutations are the
  multi-directional scans of Taming Mambas (Lumetti et al. 2024, Sec. 3, Fig. 3).
* ``reverse``: read the sequence backwards (the backward branch of bidirectional Mamba,
  Vim; the sequence flip of nnMamba's MICCSS).
* ``flip_channels``: reverse the channel axis (the channel flip of nnMamba's MICCSS,
  Gong et al. 2024, Sec. 2.2).

SegMamba's inter-slice scan (Xing et al. 2024, Sec. 2.2) reads voxel k of every depth
slice in turn, i.e. depth varies fastest: ``axes=(1, 2, 0)``. Because the order is
defined on the axes, not on a hard-coded size, it works for every feature-map shape.

2D feature maps (B, C, H, W) (nnU-Net's ``2d`` configuration) are read with the same
orders, as the volume (B, C, H, 1, W): the first axis keeps the slowest place of depth, the
last the fastest place of width. So ``FORWARD`` is the row-major raster order of the image,
``INTER_SLICE`` its column-major order (the first axis varies fastest, as depth does in 3D)
and the axis permutations become row- or column-major. Every function and method below
takes 4D or 5D tensors and 2- or 3-element spatial shapes.

Every order is a bijection: ``from_sequence(to_sequence(x)) == x``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ScanOrder:
    """How to read a (B, C, D, H, W) map as a (B, L, C) sequence; see the module doc."""

    axes: tuple[int, int, int] = (0, 1, 2)
    reverse: bool = False
    flip_channels: bool = False

    def __post_init__(self):
        if sorted(self.axes) != [0, 1, 2]:
            raise ValueError(f"axes must be a permutation of (0, 1, 2), got {self.axes}")

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) or (B, C, H, W) -> (B, L, C)."""
        if x.dim() == 4:
            x = x.unsqueeze(3)  # (B, C, H, 1, W): see the module doc
        elif x.dim() != 5:
            raise ValueError(f"expected a (B, C, D, H, W) or (B, C, H, W) feature map, got shape "
                             f"{tuple(x.shape)}")
        seq = x.permute(0, *(a + 2 for a in self.axes), 1).flatten(1, 3)
        if self.reverse:
            seq = seq.flip(1)
        if self.flip_channels:
            seq = seq.flip(2)
        return seq

    def from_sequence(self, seq: torch.Tensor, spatial_shape: Sequence[int],
                      memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """(B, L, C) -> (B, C, D, H, W), or (B, C, H, W) when ``spatial_shape`` is (H, W):
        the spatial shape of the original map. ``memory_format``: the layout of the result
        (channels-last maps of the raster order come back without a copy)."""
        if len(spatial_shape) == 2:
            if memory_format == torch.channels_last:
                memory_format = torch.channels_last_3d
            return self.from_sequence(seq, volume_shape(spatial_shape), memory_format).squeeze(3)
        D, H, W = spatial_shape
        if seq.dim() != 3 or seq.shape[1] != D * H * W:
            raise ValueError(f"expected (B, {D * H * W}, C), got shape {tuple(seq.shape)}")
        if self.flip_channels:
            seq = seq.flip(2)
        if self.reverse:
            seq = seq.flip(1)
        permuted = [(D, H, W)[a] for a in self.axes]
        vol = seq.reshape(seq.shape[0], *permuted, seq.shape[2])  # (B, a0, a1, a2, C)
        inverse = [self.axes.index(i) + 1 for i in range(3)]
        return vol.permute(0, 4, *inverse).contiguous(memory_format=memory_format)

    def permutation(self, spatial_shape: Sequence[int], device=None) -> torch.Tensor:
        """Index tensor p of length L with ``to_sequence(x)[:, i] == raster(x)[:, p[i]]``
        for a map of ``spatial_shape`` ((D, H, W) or (H, W))."""
        shape = volume_shape(spatial_shape)
        idx = torch.arange(math.prod(shape), device=device)
        grid = idx.reshape(1, 1, *shape)
        return ScanOrder(self.axes, self.reverse).to_sequence(grid)[0, :, 0]


def volume_shape(spatial_shape: Sequence[int]) -> tuple[int, int, int]:
    """The (D, H, W) volume a map of ``spatial_shape`` is read as: (H, W) -> (H, 1, W)."""
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) == 2:
        return (shape[0], 1, shape[1])
    if len(shape) != 3:
        raise ValueError(f"expected a 2D or 3D spatial shape, got {shape}")
    return shape


FORWARD = ScanOrder()
REVERSE = ScanOrder(reverse=True)
#: SegMamba's inter-slice order: depth varies fastest.
INTER_SLICE = ScanOrder(axes=(1, 2, 0))
#: the six axis permutations, raster order first.
AXIS_PERMUTATIONS = tuple(ScanOrder(axes=p) for p in itertools.permutations((0, 1, 2)))
#: nnMamba's four siamese views (MICCSS): identity, channel flip, sequence flip, both.
MICCSS_FLIPS = (
    ScanOrder(),
    ScanOrder(flip_channels=True),
    ScanOrder(reverse=True),
    ScanOrder(reverse=True, flip_channels=True),
)

NAMED_ORDERS = {
    "forward": FORWARD,
    "reverse": REVERSE,
    "inter_slice": INTER_SLICE,
    "channel_flip": MICCSS_FLIPS[1],
    "sequence_flip": MICCSS_FLIPS[2],
    "channel_sequence_flip": MICCSS_FLIPS[3],
    **{"axes_" + "".join("DHW"[a] for a in o.axes): o for o in AXIS_PERMUTATIONS},
}


def to_sequence(x: torch.Tensor, order: ScanOrder | str = FORWARD) -> torch.Tensor:
    """(B, C, D, H, W) or (B, C, H, W) -> (B, L, C) in the given order (a :class:`ScanOrder`
    or a name)."""
    return get_order(order).to_sequence(x)


def from_sequence(seq: torch.Tensor, spatial_shape: Sequence[int],
                  order: ScanOrder | str = FORWARD,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """(B, L, C) -> (B, C, *spatial_shape), undoing :func:`to_sequence` with the same order."""
    return get_order(order).from_sequence(seq, spatial_shape, memory_format)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` / ``channels_last_3d`` for a channels-last (B, C, H, W) /
    (B, C, D, H, W) map, else ``contiguous_format``."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def get_order(order: ScanOrder | str) -> ScanOrder:
    if isinstance(order, ScanOrder):
        return order
    try:
        return NAMED_ORDERS[order]
    except KeyError:
        raise ValueError(f"unknown scan order {order!r}; known: {', '.join(NAMED_ORDERS)}") from None
