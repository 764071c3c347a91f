"""SegMamba-V2 (Xing et al., "SegMamba-V2: Long-range Sequential Modeling Mamba for General 3D
Medical Image Segmentation", IEEE TMI 2025; github.com/ge-xing/SegMamba-V2), written for
nnunet-mamba on the shared Mamba layer and SegMamba's blocks (:mod:`.segmamba`).

What changes from SegMamba (V1, :class:`~nnunet_mamba.networks.segmamba.SegMamba`):

* Tri-orientated Mamba only in the two deepest encoder stages (1/8 and 1/16); the two shallow
  stages (1/2, 1/4) are convolutional: every stage starts with two :class:`LargeKernelBlock`
  (5x5x5, 3x3x3 and dilated 3x3x3 convolutions beside a 3x3x3 -> 1x1x1 path, a residual and
  squeeze-excitation); the two deep stages add two :class:`TriAxisMamba` layers.
* The orientations: one Mamba (shared weights) reads the map in three axis orders, raster
  (D, H, W) and the orders with H and with W slowest ((H, D, W), (W, H, D)); the outputs are
  summed, plus the input. (V1 used three scan branches: forward, reversed, inter-slice.)
* The image first passes a UNETR residual block (3x3x3, to ``widths[0]`` channels at full
  resolution) whose output is both the encoder's input and the full-resolution skip; the
  stem and the down-sampling are 3x3x3 stride-2 convolutions (V1: a 7x7x7 stem, norm + 2x2x2).
* No feature-level uncertainty estimation (FUE) on the skips: the public code has none
  (``fue=True`` adds V1's parameter-free FUE).

The decoder is V1's UNETR decoder (:class:`~.segmamba.UnetResBlock`,
:class:`~.segmamba.UnetUpBlock`). No deep supervision.

The paper's text was not reachable from this machine; the layout, widths (48/96/192/384,
bottleneck 768), depths (2 per stage) and Mamba settings (d_state 16, d_conv 4, expand 2)
follow the public code (``brats23/models_segmamba/segmambav2.py``). Parameters at BraTS
plans (4 inputs, 3 regions): 138,776,775, the same number as the public model class
instantiated with these channels (counted with mamba-ssm's parameter shapes). 58 % of them are in
the large-kernel blocks (the two 5x5x5 convolutions at 384 channels alone 36.9 M), 28 % in the
768-channel bottleneck blocks, 1.8 % in the Mamba layers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ssm import FORWARD, Mamba, ScanOrder
from .blocks import ChannelScaling, crop_to, pad_to_multiple
from .mamba_layers import FeatureMapSequenceMixer
from .segmamba import (ChannelMLP, ConvInstNormAct, FeatureUncertaintyWeighting, UnetResBlock,
                       UnetUpBlock)

#: SegMamba-V2's three orientations: raster (D, H, W), then H slowest, then W slowest.
TRI_AXIS_ORDERS = (FORWARD, ScanOrder(axes=(1, 0, 2)), ScanOrder(axes=(2, 1, 0)))


class LargeKernelBlock(nn.Module):
    """SegMamba-V2's large-kernel convolution block (public code's ``LargeKernelConv``).

    ``SE(deep(x) + short(x) + x)``: deep = 5x5x5, 3x3x3 and 3x3x3 dilation-2 conv-InstanceNorm-ReLU;
    short = 3x3x3 then 1x1x1 conv-InstanceNorm-ReLU; SE = squeeze-excitation with reduction 8
    (:class:`~.blocks.ChannelScaling`). (B, C, D, H, W) -> (B, C, D, H, W).
    """

    def __init__(self, channels: int, se_reduction: int = 8):
        super().__init__()
        dilated = nn.Sequential(nn.Conv3d(channels, channels, 3, padding=2, dilation=2),
                                nn.InstanceNorm3d(channels), nn.ReLU(inplace=True))
        self.deep = nn.Sequential(ConvInstNormAct(channels, channels, 5),
                                  ConvInstNormAct(channels, channels, 3), dilated)
        self.short = nn.Sequential(ConvInstNormAct(channels, channels, 3),
                                   ConvInstNormAct(channels, channels, 1))
        self.se = ChannelScaling(channels, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.deep(x) + self.short(x) + x)


class TriAxisMamba(FeatureMapSequenceMixer):
    """SegMamba-V2's tri-orientated Mamba layer: ``x + sum_o Mamba(LN(x) read in order o)``.

    One :class:`~nnunet_mamba.ssm.Mamba` (shared weights) and one LayerNorm; the orders are
    :data:`TRI_AXIS_ORDERS`, computed from the actual map size. The three sequences run as one
    batch of 3B sequences; each output is put back in raster order before the sum.
    The scan runs in float32, the rest in the autocast dtype. (B, C, D, H, W) -> (B, C, D, H, W).
    """

    orders = TRI_AXIS_ORDERS

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__(channels, input_norm=True, residual=True, fp32=False)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)

    def mix(self, tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        perms = [o.permutation(spatial_shape, device=tokens.device) for o in self.orders[1:]]
        ys = self.mamba(torch.cat([tokens, *(tokens[:, p] for p in perms)], dim=0))
        ys = ys.chunk(len(self.orders), dim=0)
        out = ys[0]
        for y, p in zip(ys[1:], perms):
            out = out + torch.empty_like(y).index_copy_(1, p, y)
        return out


class SegMambaV2Encoder(nn.Module):
    """SegMamba-V2 encoder.

    Input (B, in_channels, D, H, W), sizes divisible by ``2 ** len(widths)``. A UNETR residual
    block maps the image to ``widths[0]`` channels at full resolution (``enc1``); then stage i
    (3x3x3 stride-2 convolution, ``depths[i]`` :class:`LargeKernelBlock`, and ``depths[i]``
    :class:`TriAxisMamba` where ``mamba_stages[i]``) runs at 1/2^(i+1) with ``widths[i]``
    channels. Returns ``[enc1, f_0, ..., f_n-1]``: f_i = ChannelMLP(InstanceNorm(stage output));
    the un-normalised stage output feeds the next stage.
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (48, 96, 192, 384),
                 depths: Sequence[int] = (2, 2, 2, 2),
                 mamba_stages: Sequence[bool] = (False, False, True, True), d_state: int = 16,
                 d_conv: int = 4, expand: int = 2):
        super().__init__()
        if not len(widths) == len(depths) == len(mamba_stages):
            raise ValueError(f"one depth and one Mamba flag per stage width: widths {tuple(widths)}, "
                             f"depths {tuple(depths)}, mamba_stages {tuple(mamba_stages)}")
        self.stem_block = UnetResBlock(in_channels, widths[0])
        self.downsamples = nn.ModuleList(
            nn.Conv3d(cin, cout, 3, stride=2, padding=1)
            for cin, cout in zip([widths[0], *widths[:-1]], widths))
        self.conv_stages = nn.ModuleList(
            nn.Sequential(*[LargeKernelBlock(w) for _ in range(d)]) for w, d in zip(widths, depths))
        self.mamba_stages = nn.ModuleList(
            nn.Sequential(*[TriAxisMamba(w, d_state, d_conv, expand) for _ in range(d)]) if flag
            else nn.Identity() for w, d, flag in zip(widths, depths, mamba_stages))
        self.out_norms = nn.ModuleList(nn.InstanceNorm3d(w) for w in widths)
        self.out_mlps = nn.ModuleList(ChannelMLP(w, 2 * w) for w in widths)
        self.output_channels = [widths[0], *widths]
        self.divisor = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem_block(x)
        feats = [x]
        for down, conv, mamba, norm, mlp in zip(self.downsamples, self.conv_stages,
                                                self.mamba_stages, self.out_norms, self.out_mlps):
            x = mamba(conv(down(x)))
            feats.append(mlp(norm(x)))
        return feats


class SegMambaV2Decoder(nn.Module):
    """SegMamba-V2's UNETR decoder.

    Inputs: the encoder's ``[enc1, f_0, ..., f_n-1]`` (enc1 at full resolution with
    ``widths[0]`` channels, f_i at 1/2^(i+1) with ``widths[i]``). f_i (i < n-1) passes a
    :class:`~.segmamba.UnetResBlock` to ``widths[i+1]`` channels (after FUE if ``fue``), the
    bottleneck f_n-1 one to ``hidden``; :class:`~.segmamba.UnetUpBlock` s go back up to full
    resolution, the last one with enc1 as skip; a last residual block and a 1x1x1 head give
    the logits (B, num_classes, D, H, W). ``deep_supervision`` exists for nnU-Net's switch
    and must stay False.
    """

    def __init__(self, num_classes: int, widths: Sequence[int], hidden: int, fue: bool = False):
        super().__init__()
        self.deep_supervision = False
        targets = [*widths[1:], hidden]
        self.skip_blocks = nn.ModuleList(UnetResBlock(w, t) for w, t in zip(widths, targets))
        self.uncertainty = FeatureUncertaintyWeighting() if fue else nn.Identity()
        ups = [widths[0], *targets]  # channels from full resolution down to the bottleneck
        self.up_blocks = nn.ModuleList(UnetUpBlock(ups[k], ups[k - 1]) for k in reversed(range(1, len(ups))))
        self.final_block = UnetResBlock(widths[0], widths[0])
        self.head = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.deep_supervision:
            raise RuntimeError("SegMamba-V2 has no deep-supervision outputs; keep "
                               "decoder.deep_supervision False")
        enc1, *stage_feats = feats
        last = len(stage_feats) - 1
        skips = [enc1] + [block(f if i == last else self.uncertainty(f))
                          for i, (block, f) in enumerate(zip(self.skip_blocks, stage_feats))]
        x = skips[-1]
        for up, skip in zip(self.up_blocks, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(self.final_block(x))


class SegMambaV2(nn.Module):
    """SegMamba-V2 (Xing et al., IEEE TMI 2025): :class:`SegMambaV2Encoder` + :class:`SegMambaV2Decoder`.

    Input (B, in_channels, D, H, W) of any size: zero-padded at the end of each axis to a
    multiple of 16 and the logits (B, num_classes, D, H, W) cropped back. Defaults are the
    public code's: widths 48/96/192/384, two large-kernel blocks per stage, two tri-orientated
    Mamba layers in the two deepest stages (d_state 16, d_conv 4, expand 2), bottleneck skip
    width 768, no FUE. 138.78 M parameters at 4 inputs / 3 outputs, as the public code.
    No deep supervision: ``deep_supervision=True`` is refused.
    """

    def __init__(self, in_channels: int, num_classes: int,
                 widths: Sequence[int] = (48, 96, 192, 384), depths: Sequence[int] = (2, 2, 2, 2),
                 mamba_stages: Sequence[bool] = (False, False, True, True), hidden: int = 768,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, fue: bool = False,
                 deep_supervision: bool = False):
        super().__init__()
        if deep_supervision:
            raise ValueError("SegMamba-V2 has no deep supervision (its public code has none); "
                             "build it with deep_supervision=False (SegMambaV2Trainer sets "
                             "supports_deep_supervision = False)")
        self.encoder = SegMambaV2Encoder(in_channels, widths, depths, mamba_stages, d_state,
                                         d_conv, expand)
        self.decoder = SegMambaV2Decoder(num_classes, widths, hidden, fue)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = pad_to_multiple(x, self.encoder.divisor)
        return crop_to(self.decoder(self.encoder(x)), shape)
