"""SegMamba (Xing et al., "SegMamba: Long-range Sequential Modeling Mamba for 3D Medical Image
Segmentation", MICCAI 2024; github.com/ge-xing/SegMamba), written for nnunet-mamba.

Encoder (Sec. 2.1-2.2, Fig. 1): a 7x7x7 stride-2 stem to 48 channels and four stages of
widths 48/96/192/384 at 1/2 ... 1/16 of the input (InstanceNorm + 2x2x2 stride-2 convolutions
between stages). Each stage is a Tri-orientated Spatial Mamba (TSMamba) block: one Gated
Spatial Convolution (GSC) followed by two Tri-orientated Mamba (ToM) layers; each stage
output goes through InstanceNorm and a channel MLP (C -> 2C -> C) to become a skip feature.
Skip features pass the Feature-level Uncertainty Estimation (FUE, Sec. 2.3). Decoder: the
UNETR-style residual convolution blocks of the public code (MONAI's UnetrBasicBlock /
UnetrUpBlock, re-implemented here): a residual block per skip (the image itself, the three
skip features and the 1/16 bottleneck widened to 768 channels), transposed-convolution up
blocks with concatenation, a last residual block and a 1x1 head.

Differences from the public code, all deliberate:

* The inter-slice scan order is computed from the actual feature-map size
  (:data:`nnunet_mamba.ssm.INTER_SLICE`), not from slice counts hard-coded for 128^3 patches.
* FUE is implemented as the paper describes it; the public repository has no FUE code.
* GSC multiplies its two branches (the paper's gate); the public code adds them
  (``gsc_gate="add"`` reproduces that).

No deep supervision (neither the paper nor the code has any). At 4 inputs / 4 outputs the
network has 67.4 M parameters, as the public code.

Inside nnU-Net (:meth:`SegMamba.from_plans`) the per-level strides and kernel sizes come from
the plans (``pool_op_kernel_sizes[1:5]``, ``conv_kernel_sizes[:5]``): anisotropic data are
down-sampled in-plane first as nnU-Net does, and the ``2d`` configuration gives a 2D SegMamba
(Conv2d / InstanceNorm2d, Mamba over the H x W tokens; the inter-slice branch then reads the
image column by column, see :mod:`nnunet_mamba.ssm.scan_orders`). The stem keeps the paper's
7-voxel kernel along every axis the plans convolve (kernel > 1) and the stride of the first
pooling; down-sampling and transposed convolutions use kernel = stride of their level; the
other 3x3x3 convolutions take their level's kernel size. On isotropic plans (BraTS: strides
2, kernels 3) this is exactly the paper's network.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..ssm import FORWARD, INTER_SLICE, REVERSE, MultiScanMamba
from .blocks import ConvOps, Size, crop_to, pad_to_multiple, per_axis
from .from_plans import plans_levels
from .mamba_layers import FeatureMapSequenceMixer

#: SegMamba's convolutions: 3D, InstanceNorm without affine parameters (as the public code)
SEGMAMBA_OPS = ConvOps.create(3, "instance_plain")
#: SegMamba's depth: a stem and three down-sampling convolutions
SEGMAMBA_LEVELS = 4


class ConvInstNormAct(nn.Sequential):
    """Conv (stride 1, 'same' padding, bias) -> InstanceNorm -> ReLU; used by GSC.

    (B, in_channels, D, H, W) -> (B, out_channels, D, H, W); 2D with 2D ``ops``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size,
                 ops: ConvOps = SEGMAMBA_OPS):
        kernel = per_axis(kernel_size, ops.dim)
        super().__init__(ops.conv(in_channels, out_channels, kernel, padding=[k // 2 for k in kernel]),
                         ops.make_norm(out_channels), nn.ReLU(inplace=True))


class GatedSpatialConv(nn.Module):
    """Gated Spatial Convolution (GSC, Xing et al. 2024, Sec. 2.2, Eq. 1).

    ``z + C1(C3(C3(z)) * C1(z))``: two 3x3x3 (``kernel_size``) conv-norm-ReLU layers gated by
    a 1x1x1 conv-norm-ReLU branch, a 1x1x1 conv-norm-ReLU and a residual connection.
    ``gate="add"`` sums the branches instead, as the public code does.
    (B, C, D, H, W) -> (B, C, D, H, W); 2D with 2D ``ops``.
    """

    def __init__(self, channels: int, gate: str = "multiply", kernel_size: Size = 3,
                 ops: ConvOps = SEGMAMBA_OPS):
        super().__init__()
        if gate not in ("multiply", "add"):
            raise ValueError(f"gate must be 'multiply' or 'add', got {gate!r}")
        self.gate = gate
        self.spatial = nn.Sequential(ConvInstNormAct(channels, channels, kernel_size, ops),
                                     ConvInstNormAct(channels, channels, kernel_size, ops))
        self.pointwise = ConvInstNormAct(channels, channels, 1, ops)
        self.proj = ConvInstNormAct(channels, channels, 1, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, p = self.spatial(x), self.pointwise(x)
        return x + self.proj(s * p if self.gate == "multiply" else s + p)


class TriOrientedMamba(FeatureMapSequenceMixer):
    """Tri-orientated Mamba layer (ToM, Xing et al. 2024, Sec. 2.2, Eq. 2).

    ``x + ToM(LN(x))``: one :class:`~nnunet_mamba.ssm.MultiScanMamba` whose shared in/out
    projections feed three scan branches with their own parameters: forward, reversed and
    inter-slice (depth fastest) order, outputs summed. The orders are computed from the
    actual feature-map size. (B, C, D, H, W) -> (B, C, D, H, W).
    """

    orders = (FORWARD, REVERSE, INTER_SLICE)

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__(channels, input_norm=True, residual=True, fp32=False)
        self.mamba = MultiScanMamba(channels, len(self.orders), d_state, d_conv, expand)

    def mix(self, tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        perms = [None if o == FORWARD else o.permutation(spatial_shape, device=tokens.device)
                 for o in self.orders]
        return self.mamba(tokens, perms)


class ChannelMLP(nn.Sequential):
    """1x1x1 conv C -> hidden, GELU, 1x1x1 conv hidden -> C (SegMamba's skip MLP).

    (B, C, D, H, W) -> (B, C, D, H, W); 2D with 2D ``ops``.
    """

    def __init__(self, channels: int, hidden: int, ops: ConvOps = SEGMAMBA_OPS):
        super().__init__(ops.conv(channels, hidden, 1), nn.GELU(), ops.conv(hidden, channels, 1))


class FeatureUncertaintyWeighting(nn.Module):
    """Feature-level Uncertainty Estimation (FUE, Xing et al. 2024, Sec. 2.3).

    From a skip feature f: p = sigmoid(mean over channels of f) (B, 1, D, H, W), the
    voxel-wise uncertainty u = -p log p (at most 1/e), and the re-weighted feature
    ``f + f * (1 - u)``: voxels whose features are certain are enhanced more. Parameter-free.
    (The public SegMamba code has no FUE.) (B, C, *spatial) -> (B, C, *spatial).
    """

    @staticmethod
    def uncertainty(x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x.mean(dim=1, keepdim=True))
        return -p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * (1 - self.uncertainty(x))


def _levels(strides, kernel_sizes, num_levels: int, dim: int):
    """Per-level strides (stem first) and kernel sizes (full resolution + one per level),
    defaulting to the paper's isotropic 2 and 3."""
    strides = [per_axis(s, dim) for s in (strides or [2] * num_levels)]
    kernels = [per_axis(k, dim) for k in (kernel_sizes or [3] * (num_levels + 1))]
    if len(strides) != num_levels or len(kernels) != num_levels + 1:
        raise ValueError(f"{num_levels} stages need {num_levels} strides and {num_levels + 1} "
                         f"kernel sizes, got {len(strides)} and {len(kernels)}")
    return strides, kernels


class SegMambaEncoder(nn.Module):
    """SegMamba encoder (Xing et al. 2024, Sec. 2.1-2.2).

    Input (B, in_channels, D, H, W) (2D ``ops``: (B, in_channels, H, W)), each axis divisible
    by ``divisor`` (the product of the strides along it; 16 in the paper). Returns one skip
    feature per stage: stage i at 1/prod(strides[:i+1]) of the input with ``widths[i]``
    channels (stage output -> InstanceNorm -> :class:`ChannelMLP`); the un-normalised stage
    output feeds the next stage, as in the public code. ``strides``: one per stage (the stem's
    first; default 2), ``kernel_sizes``: full resolution + one per stage (default 3).
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (48, 96, 192, 384),
                 depths: Sequence[int] = (2, 2, 2, 2), d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, gsc_gate: str = "multiply",
                 strides: Optional[Sequence[Size]] = None,
                 kernel_sizes: Optional[Sequence[Size]] = None, ops: ConvOps = SEGMAMBA_OPS):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError("one depth per stage width")
        self.strides, self.kernel_sizes = _levels(strides, kernel_sizes, len(widths), ops.dim)
        stem_kernel = [7 if k > 1 else 1 for k in self.kernel_sizes[1]]
        self.stem = ops.conv(in_channels, widths[0], kernel_size=stem_kernel,
                             stride=self.strides[0], padding=[k // 2 for k in stem_kernel])
        self.downsamples = nn.ModuleList(
            nn.Sequential(ops.make_norm(widths[i]),
                          ops.conv(widths[i], widths[i + 1], self.strides[i + 1], self.strides[i + 1]))
            for i in range(len(widths) - 1))
        self.gscs = nn.ModuleList(GatedSpatialConv(w, gsc_gate, k, ops)
                                  for w, k in zip(widths, self.kernel_sizes[1:]))
        self.stages = nn.ModuleList(
            nn.Sequential(*[TriOrientedMamba(w, d_state, d_conv, expand) for _ in range(depth)])
            for w, depth in zip(widths, depths))
        self.out_norms = nn.ModuleList(ops.make_norm(w) for w in widths)
        self.out_mlps = nn.ModuleList(ChannelMLP(w, 2 * w, ops) for w in widths)
        self.output_channels = list(widths)
        self.divisor = tuple(math.prod(s[a] for s in self.strides) for a in range(ops.dim))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, (gsc, stage) in enumerate(zip(self.gscs, self.stages)):
            x = self.stem(x) if i == 0 else self.downsamples[i - 1](x)
            x = stage(gsc(x))
            feats.append(self.out_mlps[i](self.out_norms[i](x)))
        return feats


class UnetResBlock(nn.Module):
    """Residual block of UNETR's decoder (MONAI ``UnetResBlock``, Hatamizadeh et al. 2022).

    conv3 -> InstanceNorm -> LeakyReLU(0.01) -> conv3 -> InstanceNorm, plus the input (through
    a 1x1x1 conv and InstanceNorm when the width changes), LeakyReLU. Bias-free convolutions
    (``kernel_size``, default 3), InstanceNorm without affine parameters.
    (B, in_channels, D, H, W) -> (B, out_channels, D, H, W); 2D with 2D ``ops``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size = 3,
                 ops: ConvOps = SEGMAMBA_OPS):
        super().__init__()
        kernel = per_axis(kernel_size, ops.dim)
        pad = [k // 2 for k in kernel]
        self.conv1 = ops.conv(in_channels, out_channels, kernel, padding=pad, bias=False)
        self.norm1 = ops.make_norm(out_channels)
        self.conv2 = ops.conv(out_channels, out_channels, kernel, padding=pad, bias=False)
        self.norm2 = ops.make_norm(out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Sequential(
            ops.conv(in_channels, out_channels, 1, bias=False), ops.make_norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


class UnetUpBlock(nn.Module):
    """UNETR up block (MONAI ``UnetrUpBlock``): transposed convolution with kernel = stride
    (2x2x2 by default, no bias), concatenation with the skip, :class:`UnetResBlock` to
    ``out_channels``.

    (B, in_channels, d, h, w), skip (B, out_channels, 2d, 2h, 2w) -> (B, out_channels, 2d, 2h, 2w).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Size = 2,
                 kernel_size: Size = 3, ops: ConvOps = SEGMAMBA_OPS):
        super().__init__()
        stride = per_axis(stride, ops.dim)
        self.up = ops.conv_transpose(in_channels, out_channels, stride, stride=stride, bias=False)
        self.conv = UnetResBlock(2 * out_channels, out_channels, kernel_size, ops)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class SegMambaDecoder(nn.Module):
    """SegMamba's UNETR-style decoder with FUE on the skips (Xing et al. 2024, Sec. 2.3).

    Inputs: the image (B, in_channels, D, H, W) and the encoder features f_0 ... f_n
    (f_i at 1/2^(i+1), ``widths[i]`` channels). Skip branches: the image through a
    :class:`UnetResBlock` to ``widths[0]``; f_i (i < n) through FUE and a
    :class:`UnetResBlock` to ``widths[i+1]``; the bottleneck f_n through a
    :class:`UnetResBlock` to ``hidden`` channels. Then :class:`UnetUpBlock` s back to full
    resolution, a last :class:`UnetResBlock` and a 1x1 head: logits (B, num_classes, D, H, W).
    ``strides`` / ``kernel_sizes`` as in :class:`SegMambaEncoder` (each block uses the kernel
    size of its level; each transposed convolution undoes its level's stride).
    No deep supervision: ``deep_supervision`` exists for nnU-Net's switch and must stay False.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], hidden: int,
                 strides: Optional[Sequence[Size]] = None,
                 kernel_sizes: Optional[Sequence[Size]] = None, ops: ConvOps = SEGMAMBA_OPS):
        super().__init__()
        self.deep_supervision = False
        strides, kernels = _levels(strides, kernel_sizes, len(widths), ops.dim)
        skip_widths = [*widths, hidden]
        # skip block k works at level k (k = 0: the image, k = i + 1: f_i)
        self.skip_blocks = nn.ModuleList(
            [UnetResBlock(in_channels, skip_widths[0], kernels[0], ops)]
            + [UnetResBlock(widths[i], skip_widths[i + 1], kernels[i + 1], ops)
               for i in range(len(widths))])
        self.uncertainty = FeatureUncertaintyWeighting()
        # up block k: level k -> level k - 1 (its transposed conv undoes strides[k - 1])
        self.up_blocks = nn.ModuleList(
            UnetUpBlock(skip_widths[k], skip_widths[k - 1], strides[k - 1], kernels[k - 1], ops)
            for k in reversed(range(1, len(skip_widths))))
        self.final_block = UnetResBlock(widths[0], widths[0], kernels[0], ops)
        self.head = ops.conv(widths[0], num_classes, 1)

    def forward(self, image: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.deep_supervision:
            raise RuntimeError("SegMamba has no deep-supervision outputs; keep "
                               "decoder.deep_supervision False")
        inputs = [image, *(self.uncertainty(f) for f in feats[:-1]), feats[-1]]
        skips = [block(t) for block, t in zip(self.skip_blocks, inputs)]
        x = skips[-1]
        for up, skip in zip(self.up_blocks, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(self.final_block(x))


class SegMamba(nn.Module):
    """SegMamba (Xing et al. 2024): :class:`SegMambaEncoder` + :class:`SegMambaDecoder`.

    Input (B, in_channels, D, H, W) (``spatial_dims=2``: (B, in_channels, H, W)) of any size:
    zero-padded at the end of each axis to a multiple of ``encoder.divisor`` (16 in the paper)
    and the logits (B, num_classes, *size) cropped back. Defaults are the paper's: widths
    48/96/192/384, two ToM layers per stage (Mamba d_state 16, d_conv 4, expand 2),
    bottleneck skip width 768, strides 2, kernels 3 (stem 7). 67.4 M parameters at 4 inputs /
    4 outputs. ``strides`` (one per stage) and ``kernel_sizes`` (full resolution + one per
    stage) may be anisotropic; :meth:`from_plans` takes them from nnU-Net's plans.
    No deep supervision: ``deep_supervision=True`` is refused.
    """

    def __init__(self, in_channels: int, num_classes: int,
                 widths: Sequence[int] = (48, 96, 192, 384), depths: Sequence[int] = (2, 2, 2, 2),
                 hidden: int = 768, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 gsc_gate: str = "multiply", deep_supervision: bool = False,
                 strides: Optional[Sequence[Size]] = None,
                 kernel_sizes: Optional[Sequence[Size]] = None, spatial_dims: int = 3):
        super().__init__()
        if deep_supervision:
            raise ValueError("SegMamba has no deep supervision (Xing et al. 2024); build it with "
                             "deep_supervision=False (its trainer sets supports_deep_supervision "
                             "= False)")
        ops = ConvOps.create(spatial_dims, "instance_plain")
        self.encoder = SegMambaEncoder(in_channels, widths, depths, d_state, d_conv, expand,
                                       gsc_gate, strides, kernel_sizes, ops)
        self.decoder = SegMambaDecoder(in_channels, num_classes, widths, hidden,
                                       self.encoder.strides, self.encoder.kernel_sizes, ops)

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = False, **overrides) -> "SegMamba":
        """The network for an nnU-Net plans configuration (``2d``, ``3d_fullres``,
        ``3d_lowres``, ``3d_cascade_fullres``): the plans' dimensionality, strides
        ``pool_op_kernel_sizes[1:5]`` and kernel sizes ``conv_kernel_sizes[:5]``. Plans that
        pool fewer than 4 times give as many stages as poolings (the first widths and depths,
        bottleneck width twice the last stage's). ``deep_supervision`` is ignored (SegMamba has
        none)."""
        strides, kernels = plans_levels(configuration_manager, SEGMAMBA_LEVELS, "SegMamba")
        n = len(strides)
        kwargs = {"strides": strides, "kernel_sizes": kernels, "spatial_dims": len(strides[0])}
        if n < SEGMAMBA_LEVELS:
            widths = (48, 96, 192, 384)[:n]
            kwargs.update(widths=widths, depths=(2,) * n, hidden=2 * widths[-1])
        kwargs.update(overrides)
        return cls(num_input_channels, num_output_channels, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = pad_to_multiple(x, self.encoder.divisor)
        return crop_to(self.decoder(x, self.encoder(x)), shape)
