"""Building blocks shared by the nnMamba networks (segmentation, landmarks, classification).

Architectures in this package compose these blocks; none re-implements them. Tensor
shapes use (B, C, D, H, W). Paper references are to Gong et al., "nnMamba: 3D Biomedical
Image Segmentation, Classification and Landmark Detection with State Space Model" (2024).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm import MICCSS_FLIPS, Mamba


class ConvNormAct(nn.Sequential):
    """Conv3d -> BatchNorm3d -> ReLU (the activation optional).

    (B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, act: bool = True, bias: bool = False):
        layers = [nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride,
                            padding=kernel_size // 2, bias=bias),
                  nn.BatchNorm3d(out_channels)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two 3x3x3 ConvNormAct; the first may be strided (the nnMamba stem uses stride 2).

    (B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(ConvNormAct(in_channels, out_channels, 3, stride),
                         ConvNormAct(out_channels, out_channels, 3))


class MICCSS(nn.Module):
    """Mamba-In-Convolution with Channel-Spatial Siamese learning (paper Sec. 2.2, Fig. 1).

    1x1 ConvNormAct; one Mamba run on the voxel sequence and on its channel-flipped,
    sequence-flipped and doubly flipped copies (siamese: the same weights), each output
    flipped back, the four averaged and added to the conv features; 1x1 ConvNormAct.
    The sequences come from :data:`nnunet_mamba.ssm.MICCSS_FLIPS`.

    (B, C, D, H, W) -> (B, C, D, H, W).
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 views=MICCSS_FLIPS):
        super().__init__()
        self.proj_in = ConvNormAct(channels, channels, kernel_size=1)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj_out = ConvNormAct(channels, channels, kernel_size=1)
        self.views = tuple(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        shape = x.shape[2:]
        mixed = sum(v.from_sequence(self.mamba(v.to_sequence(x)), shape) for v in self.views)
        return self.proj_out(x + mixed / len(self.views))


class ResidualBlock(nn.Module):
    """Basic residual block (He et al. 2016) with an optional global branch (paper Sec. 2.2).

    out = ReLU(BN(conv(ReLU(BN(conv(x))))) + branch(x) + shortcut(x)); the branch (e.g. a
    :class:`MICCSS`) sees the block input, as in the Res-Mamba blocks of nnMamba.
    (B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 branch: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, stride)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, act=False)
        self.branch = branch
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvNormAct(in_channels, out_channels, 1, stride, act=False)
        else:
            self.shortcut = nn.Identity()
        if branch is not None and (stride != 1 or in_channels != out_channels):
            raise ValueError("a global branch needs a block that keeps shape and channels")
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.branch is not None:
            out = out + self.branch(x)
        return self.act(out + self.shortcut(x))


class ResidualStage(nn.Sequential):
    """A strided residual block followed by ``num_blocks - 1`` blocks that share one branch.

    In nnMamba the non-strided blocks of a stage share a single :class:`MICCSS` (one Mamba
    per stage). (B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, stride: int = 2,
                 shared_branch: Optional[nn.Module] = None):
        blocks = [ResidualBlock(in_channels, out_channels, stride)]
        blocks += [ResidualBlock(out_channels, out_channels, 1, shared_branch)
                   for _ in range(num_blocks - 1)]
        super().__init__(*blocks)


class ChannelScaling(nn.Module):
    """Squeeze-excitation weights of a skip feature (the paper's skip/channel scaling).

    Global average pool, C -> C/r -> C MLP, sigmoid; returns the skip multiplied by the
    weights. (B, C, D, H, W) -> (B, C, D, H, W).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3, 4)))
        return x * w[:, :, None, None, None]


class UpConcatBlock(nn.Module):
    """Trilinear up-sampling to the skip's size, concatenation, :class:`DoubleConv`.

    (B, C_low, d, h, w), skip (B, C_skip, D, H, W) -> (B, out_channels, D, H, W).
    """

    def __init__(self, low_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv = DoubleConv(low_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of (B, C, D, H, W) at their ends to a multiple of ``multiple``.

    Returns the padded tensor and the original spatial shape (for :func:`crop_to`).
    """
    shape = tuple(x.shape[2:])
    pads = [(-s) % multiple for s in shape]
    if any(pads):
        x = F.pad(x, [p for pad in reversed(pads) for p in (0, pad)])
    return x, shape


def crop_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Keep the first ``shape`` voxels of each spatial axis (undoes :func:`pad_to_multiple`)."""
    return x[(...,) + tuple(slice(0, int(s)) for s in shape)]
