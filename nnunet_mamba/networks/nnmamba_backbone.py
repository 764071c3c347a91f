"""nnMamba's shared backbone (Gong et al. 2024, Sec. 2.2, Fig. 1): the residual encoder with
MICCSS branches and the convolutional decoder with channel-scaled skips.

The segmentation (:mod:`.nnmamba_seg`), classification (:mod:`.nnmamba_cls`) and landmark
(:mod:`.nnmamba_landmark`) networks are built from these two modules:

* :class:`ResMambaEncoder`: a strided double-conv stem and residual stages; non-strided
  blocks of a stage may share one MICCSS branch, and one MICCSS layer may follow the stem.
* :class:`SkipScaledDecoder`: skips scaled by squeeze-excitation weights, up-sampling and
  double convolutions, a full-resolution head and (optionally) one 1x1 head per decoder
  resolution for nnU-Net's deep supervision.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .blocks import (MICCSS, OPS_3D, ChannelScaling, ConvNormAct, ConvOps, DoubleConv,
                     ResidualStage, Size, UpConcatBlock, per_axis, upsample_linear)


def level_sizes(strides: Optional[Sequence[Size]], kernel_sizes: Optional[Sequence[Size]],
            num_levels: int, dim: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Per-level strides (one per down-sampling) and kernel sizes (full resolution + one per
    level), defaulting to the paper's isotropic 2 and 3."""
    strides = [per_axis(s, dim) for s in (strides or [2] * num_levels)]
    kernels = [per_axis(k, dim) for k in (kernel_sizes or [3] * (len(strides) + 1))]
    if len(kernels) != len(strides) + 1:
        raise ValueError(f"{len(strides)} strides need {len(strides) + 1} kernel sizes (full "
                         f"resolution + one per level), got {len(kernels)}")
    return strides, kernels


class ResMambaEncoder(nn.Module):
    """Stem + residual stages with optional MICCSS branches (nnMamba encoder, Sec. 2.2).

    Input (B, in_channels, D, H, W) (or (B, in_channels, H, W) with 2D ``ops``), each axis
    divisible by ``divisor`` (the product of the strides along it). Returns the skips
    [stem, stage 1, ..., stage n]: the stem at 1/strides[0] with ``base_channels`` channels,
    stage i at 1/prod(strides[:i+1]) with ``widths[i-1]`` channels. ``strides`` has
    ``len(widths) + 1`` entries (default 2 each, the paper), ``kernel_sizes`` one per level
    and one for full resolution first (default 3; ``kernel_sizes[0]`` is not used here).

    ``mamba_stages[i]`` puts a MICCSS branch (shared by the non-strided blocks) into stage i;
    ``stem_mamba`` adds one after the stem (the landmark variant, Sec. 2.2).
    """

    def __init__(self, in_channels: int, base_channels: int = 32,
                 widths: Sequence[int] = (64, 128, 256), blocks_per_stage: int = 3,
                 mamba_stages: Sequence[bool] = (True, True, True), stem_mamba: bool = False,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 strides: Optional[Sequence[Size]] = None,
                 kernel_sizes: Optional[Sequence[Size]] = None, ops: ConvOps = OPS_3D):
        super().__init__()
        if len(mamba_stages) != len(widths):
            raise ValueError("mamba_stages needs one entry per stage width")
        self.strides, self.kernel_sizes = level_sizes(strides, kernel_sizes, len(widths) + 1, ops.dim)
        if len(self.strides) != len(widths) + 1:
            raise ValueError(f"{len(widths)} stages need {len(widths) + 1} strides (stem first), "
                             f"got {len(self.strides)}")
        mamba_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand, ops=ops)
        self.stem = DoubleConv(in_channels, base_channels, self.strides[0], self.kernel_sizes[1], ops)
        self.stem_mamba = MICCSS(base_channels, **mamba_kw) if stem_mamba else None
        stages, prev = [], base_channels
        for i, (width, use_mamba) in enumerate(zip(widths, mamba_stages), start=1):
            branch = MICCSS(width, **mamba_kw) if use_mamba else None
            stages.append(ResidualStage(prev, width, blocks_per_stage, self.strides[i], branch,
                                        self.kernel_sizes[i + 1], ops))
            prev = width
        self.stages = nn.ModuleList(stages)
        self.output_channels = [base_channels, *widths]
        self.divisor = tuple(math.prod(s[a] for s in self.strides) for a in range(ops.dim))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        if self.stem_mamba is not None:
            x = x + self.stem_mamba(x)
        skips = [x]
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class SkipScaledDecoder(nn.Module):
    """nnMamba's convolutional decoder with channel-scaled skips (Sec. 2.2, Fig. 1).

    Takes the encoder skips [s_0, ..., s_n] (s_0 at 1/first_stride). Each level: up-sampling
    of the deeper features to the skip's size (trilinear; bilinear in 2D), concatenation with
    the SE-scaled skip, :class:`DoubleConv` to the skip's width; a final up-sampling by
    ``first_stride`` to the input resolution, a ConvNormAct and a 1x1 head. ``kernel_sizes``:
    full resolution first, then one per skip (default 3).

    Output with ``deep_supervision=False``: logits (B, num_classes, *input size). With it: a
    list of logits, highest resolution first: the input's, then s_0's, ..., s_{n-1}'s
    (n + 1 maps), as nnU-Net's deep-supervision loss expects. ``deep_supervision`` is the
    attribute nnU-Net's ``set_deep_supervision_enabled`` switches. ``ds_heads=False`` builds
    no deep-supervision heads at all (the landmark networks: full resolution only, no
    parameters without gradients); deep supervision cannot be switched on then.
    """

    def __init__(self, encoder_channels: Sequence[int], num_classes: int,
                 deep_supervision: bool = False, head_channels: int = 16,
                 skip_reduction: int = 16, first_stride: Size = 2,
                 kernel_sizes: Optional[Sequence[Size]] = None, ops: ConvOps = OPS_3D,
                 ds_heads: bool = True):
        super().__init__()
        if deep_supervision and not ds_heads:
            raise ValueError("deep_supervision needs the deep-supervision heads (ds_heads=True)")
        self.deep_supervision = deep_supervision
        chans = list(encoder_channels)
        kernels = kernel_sizes or [3] * (len(chans) + 1)
        self.first_stride = tuple(float(s) for s in per_axis(first_stride, ops.dim))
        self.skip_scaling = nn.ModuleList(ChannelScaling(c, skip_reduction) for c in chans[:-1])
        self.up_blocks = nn.ModuleList(
            UpConcatBlock(chans[i + 1], chans[i], chans[i], kernels[i + 1], ops)
            for i in reversed(range(len(chans) - 1)))
        self.final_conv = ConvNormAct(chans[0], head_channels, kernels[0], ops=ops)
        self.seg_head = ops.conv(head_channels, num_classes, 1)
        # deep-supervision heads on the up-block outputs, finest first (none with
        # ``ds_heads=False``: a network that only ever uses the full-resolution output)
        self.ds_heads = nn.ModuleList(
            ops.conv(chans[i], num_classes, 1) for i in range(len(chans) - 1) if ds_heads)

    def forward(self, skips: Sequence[torch.Tensor]):
        x = skips[-1]
        decoded = []
        for up, i in zip(self.up_blocks, reversed(range(len(skips) - 1))):
            x = up(x, self.skip_scaling[i](skips[i]))
            decoded.append(x)
        full = upsample_linear(x, [round(n * f) for n, f in zip(x.shape[2:], self.first_stride)])
        logits = self.seg_head(self.final_conv(full))
        if not self.deep_supervision:
            return logits
        # decoded holds the coarsest ... finest skip resolutions; emit them finest first
        outs = [logits]
        for j, head in enumerate(self.ds_heads):
            outs.append(head(decoded[-1 - j]))
        return outs
