"""nnMamba for segmentation (Gong et al. 2024, Sec. 2.2 and Fig. 1).

Encoder: a stride-2 double-conv stem and three residual stages (1/4, 1/8, 1/16 of the
input) whose non-strided blocks add a shared MICCSS branch. Decoder: skip features scaled
by squeeze-excitation weights, trilinear up-sampling and double convolutions, plus
1x1 segmentation heads at every decoder resolution for nnU-Net's deep supervision.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (MICCSS, ChannelScaling, ConvNormAct, DoubleConv, ResidualStage,
                     UpConcatBlock, crop_to, pad_to_multiple)


class ResMambaEncoder(nn.Module):
    """Stem + residual stages with optional MICCSS branches (nnMamba encoder, Sec. 2.2).

    Input (B, in_channels, D, H, W), spatial sizes divisible by ``2 ** (1 + len(widths))``.
    Returns the skips [stem, stage 1, ..., stage n]: the stem at 1/2 resolution with
    ``base_channels`` channels, stage i at 1/2^(i+1) with ``widths[i-1]`` channels.

    ``mamba_stages[i]`` puts a MICCSS branch (shared by the non-strided blocks) into stage i;
    ``stem_mamba`` adds one after the stem (the landmark variant, Sec. 2.2).
    """

    def __init__(self, in_channels: int, base_channels: int = 32,
                 widths: Sequence[int] = (64, 128, 256), blocks_per_stage: int = 3,
                 mamba_stages: Sequence[bool] = (True, True, True), stem_mamba: bool = False,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        if len(mamba_stages) != len(widths):
            raise ValueError("mamba_stages needs one entry per stage width")
        mamba_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.stem = DoubleConv(in_channels, base_channels, stride=2)
        self.stem_mamba = MICCSS(base_channels, **mamba_kw) if stem_mamba else None
        stages, prev = [], base_channels
        for width, use_mamba in zip(widths, mamba_stages):
            branch = MICCSS(width, **mamba_kw) if use_mamba else None
            stages.append(ResidualStage(prev, width, blocks_per_stage, 2, branch))
            prev = width
        self.stages = nn.ModuleList(stages)
        self.output_channels = [base_channels, *widths]
        self.divisor = 2 ** (1 + len(widths))

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

    Takes the encoder skips [s_0 (1/2), ..., s_n (1/2^(n+1))]. Each level: trilinear x2 of the
    deeper features, concatenation with the SE-scaled skip, :class:`DoubleConv` to the skip's
    width; a final x2 up-sampling to the input resolution, a 3x3x3 ConvNormAct and a 1x1 head.

    Output with ``deep_supervision=False``: logits (B, num_classes, D, H, W). With it: a list
    of logits, highest resolution first: input, 1/2, ..., 1/2^n resolution (n + 1 maps),
    as nnU-Net's deep-supervision loss expects. ``deep_supervision`` is the attribute nnU-Net's
    ``set_deep_supervision_enabled`` switches.
    """

    def __init__(self, encoder_channels: Sequence[int], num_classes: int,
                 deep_supervision: bool = False, head_channels: int = 16,
                 skip_reduction: int = 16):
        super().__init__()
        self.deep_supervision = deep_supervision
        chans = list(encoder_channels)
        self.skip_scaling = nn.ModuleList(ChannelScaling(c, skip_reduction) for c in chans[:-1])
        self.up_blocks = nn.ModuleList(
            UpConcatBlock(chans[i + 1], chans[i], chans[i])
            for i in reversed(range(len(chans) - 1)))
        self.final_conv = ConvNormAct(chans[0], head_channels)
        self.seg_head = nn.Conv3d(head_channels, num_classes, 1)
        # deep-supervision heads on the up-block outputs at 1/2, 1/4, ..., 1/2^n
        self.ds_heads = nn.ModuleList(
            nn.Conv3d(chans[i], num_classes, 1) for i in range(len(chans) - 1))

    def forward(self, skips: Sequence[torch.Tensor]):
        x = skips[-1]
        decoded = []
        for up, i in zip(self.up_blocks, reversed(range(len(skips) - 1))):
            x = up(x, self.skip_scaling[i](skips[i]))
            decoded.append(x)
        full = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        logits = self.seg_head(self.final_conv(full))
        if not self.deep_supervision:
            return logits
        # decoded holds the 1/2^n ... 1/2 resolutions; emit them finest first
        outs = [logits]
        for j, head in enumerate(self.ds_heads):
            outs.append(head(decoded[-1 - j]))
        return outs


class nnMambaSeg(nn.Module):
    """nnMamba segmentation network (Gong et al. 2024, Sec. 2.2, Fig. 1).

    Input (B, in_channels, D, H, W) of any size: it is zero-padded at the end of each axis to
    a multiple of 16 and every output is cropped back (the padding only, never the image).
    Output: logits (B, num_classes, D, H, W), or with deep supervision a list of 4 logit maps
    at full, 1/2, 1/4 and 1/8 resolution (sizes ``round(s * scale)`` as in nnU-Net).

    Defaults are the paper's: base width 32, stage widths 64/128/256, 3 blocks per stage,
    one MICCSS (Mamba d_state 16, d_conv 4, expand 2) per stage. At in_channels=1,
    num_classes=16: 15.6 M parameters (paper: 15.55 M); see ``scripts/model_size.py``.
    """

    #: relative resolutions of the deep-supervision outputs, finest first
    ds_scales = (1.0, 0.5, 0.25, 0.125)

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 32,
                 blocks_per_stage: int = 3, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, deep_supervision: bool = False):
        super().__init__()
        widths = (2 * base_channels, 4 * base_channels, 8 * base_channels)
        self.encoder = ResMambaEncoder(in_channels, base_channels, widths, blocks_per_stage,
                                       (True, True, True), False, d_state, d_conv, expand)
        self.decoder = SkipScaledDecoder(self.encoder.output_channels, num_classes,
                                         deep_supervision)

    def forward(self, x: torch.Tensor):
        x, shape = pad_to_multiple(x, self.encoder.divisor)
        out = self.decoder(self.encoder(x))
        if isinstance(out, torch.Tensor):
            return crop_to(out, shape)
        return [crop_to(o, [round(s * scale) for s in shape])
                for o, scale in zip(out, self.ds_scales)]
