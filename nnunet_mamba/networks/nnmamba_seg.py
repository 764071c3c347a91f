"""nnMamba for segmentation (Gong et al. 2024, Sec. 2.2 and Fig. 1).

Encoder: a strided double-conv stem and residual stages (the paper: stride 2 everywhere, 1/2,
1/4, 1/8, 1/16 of the input) whose non-strided blocks add a shared MICCSS branch. Decoder:
skip features scaled by squeeze-excitation weights, up-sampling and double convolutions,
plus 1x1 segmentation heads at every decoder resolution for nnU-Net's deep supervision.

Inside nnU-Net (:meth:`nnMambaSeg.from_plans`) the per-level strides and kernel sizes come
from the plans (``pool_op_kernel_sizes`` / ``conv_kernel_sizes``), so anisotropic data are
pooled in-plane first as nnU-Net pools them, and the ``2d`` configuration gives the 2D
network (Conv2d, BatchNorm2d, Mamba over the H x W tokens). On isotropic plans (BraTS:
128^3, strides 2, kernels 3) this is exactly the paper's network.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (MICCSS, OPS_3D, ChannelScaling, ConvNormAct, ConvOps, DoubleConv,
                     ResidualStage, Size, UpConcatBlock, crop_to, pad_to_multiple, per_axis,
                     plans_levels)

#: nnMamba's depth: a stem and three residual stages, i.e. four down-samplings
NNMAMBA_LEVELS = 4


def _levels(strides: Optional[Sequence[Size]], kernel_sizes: Optional[Sequence[Size]],
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
        self.strides, self.kernel_sizes = _levels(strides, kernel_sizes, len(widths) + 1, ops.dim)
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
    attribute nnU-Net's ``set_deep_supervision_enabled`` switches.
    """

    def __init__(self, encoder_channels: Sequence[int], num_classes: int,
                 deep_supervision: bool = False, head_channels: int = 16,
                 skip_reduction: int = 16, first_stride: Size = 2,
                 kernel_sizes: Optional[Sequence[Size]] = None, ops: ConvOps = OPS_3D):
        super().__init__()
        self.deep_supervision = deep_supervision
        chans = list(encoder_channels)
        kernels = kernel_sizes or [3] * (len(chans) + 1)
        self.first_stride = tuple(float(s) for s in per_axis(first_stride, ops.dim))
        self.mode = ops.interpolation
        self.skip_scaling = nn.ModuleList(ChannelScaling(c, skip_reduction) for c in chans[:-1])
        self.up_blocks = nn.ModuleList(
            UpConcatBlock(chans[i + 1], chans[i], chans[i], kernels[i + 1], ops)
            for i in reversed(range(len(chans) - 1)))
        self.final_conv = ConvNormAct(chans[0], head_channels, kernels[0], ops=ops)
        self.seg_head = ops.conv(head_channels, num_classes, 1)
        # deep-supervision heads on the up-block outputs, finest first
        self.ds_heads = nn.ModuleList(
            ops.conv(chans[i], num_classes, 1) for i in range(len(chans) - 1))

    def forward(self, skips: Sequence[torch.Tensor]):
        x = skips[-1]
        decoded = []
        for up, i in zip(self.up_blocks, reversed(range(len(skips) - 1))):
            x = up(x, self.skip_scaling[i](skips[i]))
            decoded.append(x)
        full = F.interpolate(x, scale_factor=self.first_stride, mode=self.mode,
                             align_corners=False)
        logits = self.seg_head(self.final_conv(full))
        if not self.deep_supervision:
            return logits
        # decoded holds the coarsest ... finest skip resolutions; emit them finest first
        outs = [logits]
        for j, head in enumerate(self.ds_heads):
            outs.append(head(decoded[-1 - j]))
        return outs


class nnMambaSeg(nn.Module):
    """nnMamba segmentation network (Gong et al. 2024, Sec. 2.2, Fig. 1).

    Input (B, in_channels, D, H, W) (``spatial_dims=2``: (B, in_channels, H, W)) of any size:
    zero-padded at the end of each axis to a multiple of ``encoder.divisor`` (the product of
    the strides along it; 16 in the paper) and every output cropped back (the padding only,
    never the image). Output: logits (B, num_classes, *size), or with deep supervision a list
    of ``len(strides)`` logit maps at the relative resolutions ``ds_scales`` (per axis, finest
    first; sizes ``round(s * scale)`` as in nnU-Net).

    Defaults are the paper's: base width 32, stage widths 64/128/256, 3 blocks per stage,
    one MICCSS (Mamba d_state 16, d_conv 4, expand 2) per stage, strides 2, kernels 3,
    BatchNorm. ``strides`` (one per down-sampling, 2 to 4 of them; the stage widths double
    per level) and ``kernel_sizes`` (full resolution + one per level) may be anisotropic.
    ``norm``: 'batch' (the paper's BatchNorm, with bias-corrected eval statistics, see
    :class:`~nnunet_mamba.networks.blocks.BiasCorrectedBatchNorm3d`) or 'instance'
    (nnU-Net's InstanceNorm). At in_channels=1, num_classes=16: 15.6 M parameters (paper:
    15.55 M); see ``scripts/model_size.py``.
    """

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 32,
                 blocks_per_stage: int = 3, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, deep_supervision: bool = False,
                 strides: Optional[Sequence[Size]] = None,
                 kernel_sizes: Optional[Sequence[Size]] = None, spatial_dims: int = 3,
                 norm: str = "batch"):
        super().__init__()
        ops = ConvOps.create(spatial_dims, norm)
        strides, kernels = _levels(strides, kernel_sizes, NNMAMBA_LEVELS, spatial_dims)
        if not 2 <= len(strides) <= NNMAMBA_LEVELS:
            raise ValueError(f"nnMambaSeg needs 2 to {NNMAMBA_LEVELS} down-samplings (a stem and "
                             f"1 to 3 Mamba stages), got {len(strides)}")
        widths = tuple(base_channels * 2 ** i for i in range(1, len(strides)))
        self.encoder = ResMambaEncoder(in_channels, base_channels, widths, blocks_per_stage,
                                       (True,) * len(widths), False, d_state, d_conv, expand,
                                       strides, kernels, ops)
        self.decoder = SkipScaledDecoder(self.encoder.output_channels, num_classes,
                                         deep_supervision, first_stride=strides[0],
                                         kernel_sizes=kernels, ops=ops)
        #: relative resolutions of the deep-supervision outputs, per axis, finest first:
        #: 1 / cumprod(strides), as nnU-Net derives them from its pooling
        scales, cum = [(1.0,) * spatial_dims], [1] * spatial_dims
        for s in strides[:-1]:
            cum = [c * k for c, k in zip(cum, s)]
            scales.append(tuple(1.0 / c for c in cum))
        self.ds_scales = scales

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, **overrides) -> "nnMambaSeg":
        """The network for an nnU-Net plans configuration (``2d``, ``3d_fullres``,
        ``3d_lowres``, ``3d_cascade_fullres``): the plans' dimensionality and, for nnMamba's
        levels, the strides ``pool_op_kernel_sizes[1:5]`` and kernel sizes
        ``conv_kernel_sizes[:5]`` (nnU-Net's stage 0 is at full resolution). Plans with more
        than 4 poolings: the first 4 are taken (nnMamba's depth); with fewer: fewer stages."""
        strides, kernels = plans_levels(configuration_manager, NNMAMBA_LEVELS, "nnMambaSeg")
        kwargs = {"strides": strides, "kernel_sizes": kernels, "spatial_dims": len(strides[0]),
                  **overrides}
        return cls(num_input_channels, num_output_channels, deep_supervision=deep_supervision,
                   **kwargs)

    def forward(self, x: torch.Tensor):
        x, shape = pad_to_multiple(x, self.encoder.divisor)
        out = self.decoder(self.encoder(x))
        if isinstance(out, torch.Tensor):
            return crop_to(out, shape)
        return [crop_to(o, [round(s * f) for s, f in zip(shape, scale)])
                for o, scale in zip(out, self.ds_scales)]
