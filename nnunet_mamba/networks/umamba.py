"""U-Mamba Bot and U-Mamba Enc (Ma, Li & Wang, "U-Mamba: Enhancing Long-range Dependency for
Biomedical Image Segmentation", 2024; github.com/bowang-lab/U-Mamba), written for nnunet-mamba.

Both are residual U-Nets built from the nnU-Net plans, as in the public code (Sec. 2.1-2.2):

* encoder: a full-resolution stem and one stage per plans stage, each a residual block with a
  1x1x1 projection shortcut (the first one strided) followed by nnU-Net's ResNet-D residual
  blocks (``BasicBlockD``); stages in the deeper half of the network have one block only;
* decoder: nearest-neighbour up-sampling and a 1x1x1 convolution, concatenation with the
  skip, the same residual blocks (one in the two finest decoder stages of a 6-stage net), a
  1x1x1 segmentation head per stage for nnU-Net's deep supervision;
* the U-Mamba block's Mamba layer (Fig. 1): LayerNorm over channels, Mamba (d_state 16,
  d_conv 4, expand 2) over the flattened voxels, in float32 with autocast off, no residual.
  :class:`UMambaBot` has one at the bottleneck; :class:`UMambaEnc` one after every encoder
  stage, the full-resolution stage included. U-Mamba Enc uses the channels as tokens in
  stages whose feature map (at the plans' patch size) has no more voxels than channels.

Initialisation: He (negative slope 1e-2) for the convolutions, as the public code.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from ..ssm import Mamba
from .from_plans import unet_kwargs_from_plans
from .mamba_layers import FeatureMapMamba, MambaAfterStagesMixin, stage_flags


class ProjectedResidualBlock(nn.Module):
    """U-Mamba's residual block: conv-norm-act, conv-norm, plus the input through a (strided)
    1x1x1 convolution, act. Convolutions with bias.

    (B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride).
    """

    def __init__(self, conv_op: type, in_channels: int, out_channels: int, kernel_size,
                 stride, norm_op: type, norm_op_kwargs: dict, nonlin: type, nonlin_kwargs: dict):
        super().__init__()
        padding = [k // 2 for k in kernel_size]
        self.conv1 = conv_op(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.norm1 = norm_op(out_channels, **norm_op_kwargs)
        self.act1 = nonlin(**nonlin_kwargs)
        self.conv2 = conv_op(out_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = norm_op(out_channels, **norm_op_kwargs)
        self.act2 = nonlin(**nonlin_kwargs)
        self.conv3 = conv_op(in_channels, out_channels, kernel_size=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.conv3(x))


class _ConvSettings:
    """The plans' convolution settings shared by U-Mamba's encoder and decoder blocks."""

    def __init__(self, conv_op, conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        self.conv_op, self.conv_bias = conv_op, conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, norm_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs

    def stage(self, in_channels: int, out_channels: int, kernel_size, stride,
              n_blocks: int) -> nn.Sequential:
        """A :class:`ProjectedResidualBlock` and ``n_blocks - 1`` ``BasicBlockD``."""
        return nn.Sequential(
            ProjectedResidualBlock(self.conv_op, in_channels, out_channels, kernel_size, stride,
                                   self.norm_op, self.norm_op_kwargs, self.nonlin,
                                   self.nonlin_kwargs),
            *[BasicBlockD(self.conv_op, out_channels, out_channels, kernel_size, 1,
                          self.conv_bias, self.norm_op, self.norm_op_kwargs, nonlin=self.nonlin,
                          nonlin_kwargs=self.nonlin_kwargs) for _ in range(n_blocks - 1)])


class UMambaEncoder(MambaAfterStagesMixin, nn.Module):
    """U-Mamba's residual encoder with Mamba layers after the stages flagged in ``mamba_stages``.

    Input (B, input_channels, D, H, W); returns the skips [stage 0 (stride 1 after the stem),
    ..., bottleneck], stage s with ``features_per_stage[s]`` channels. With ``patch_size``,
    the Mamba layer of a stage whose map (at that patch size) has no more voxels than
    channels treats the channels as tokens (U-Mamba Enc); such a network then only runs on
    that patch size (nnU-Net's sliding window always uses it).
    """

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], kernel_sizes,
                 strides, n_blocks_per_stage: Sequence[int], settings: _ConvSettings,
                 mamba_stages: Sequence[bool], patch_size: Optional[Sequence[int]] = None):
        super().__init__()
        n = len(features_per_stage)
        self.kernel_sizes = [list(k) for k in kernel_sizes]
        self.strides = [list(s) for s in strides]
        self.output_channels = list(features_per_stage)
        self.conv_op = settings.conv_op
        self.stem = settings.stage(input_channels, features_per_stage[0], self.kernel_sizes[0], 1,
                                   n_blocks_per_stage[0])
        chans = [features_per_stage[0], *features_per_stage]
        self.stages = nn.Sequential(*[
            settings.stage(chans[s], chans[s + 1], self.kernel_sizes[s], self.strides[s],
                           n_blocks_per_stage[s]) for s in range(n)])
        layers, size = [], list(patch_size) if patch_size is not None else None
        for s, (c, use) in enumerate(zip(features_per_stage, mamba_stages)):
            voxels = None
            if size is not None:
                size = [i // j for i, j in zip(size, self.strides[s])]
                voxels = math.prod(size) if math.prod(size) <= c else None
            d = voxels if voxels is not None else c
            layers.append(FeatureMapMamba(c, [Mamba(d)], num_voxels=voxels) if use else nn.Identity())
        self.mamba_layers = nn.ModuleList(layers)
        self.mamba_on_skips_only = False


class UpsampleProject(nn.Module):
    """Nearest-neighbour up-sampling by ``scale`` and a 1x1x1 convolution (U-Mamba's decoder).

    (B, in_channels, d, h, w) -> (B, out_channels, d*s0, h*s1, w*s2).
    """

    def __init__(self, conv_op: type, in_channels: int, out_channels: int, scale: Sequence[int]):
        super().__init__()
        self.scale = tuple(float(s) for s in scale)
        self.conv = conv_op(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class UMambaDecoder(nn.Module):
    """U-Mamba's residual decoder (Ma et al. 2024, Sec. 2.1).

    Takes the encoder skips (bottleneck last). Each stage: :class:`UpsampleProject` of the
    deeper features, concatenation with the skip, a residual stage of
    ``n_conv_per_stage[s]`` blocks; a 1x1x1 head per stage. Output: logits at the finest skip's
    resolution, or with ``deep_supervision`` (nnU-Net's switch) a list of ``n_stages - 1`` logit
    maps, highest resolution first.
    """

    def __init__(self, encoder: UMambaEncoder, num_classes: int, n_conv_per_stage: Sequence[int],
                 settings: _ConvSettings, deep_supervision: bool):
        super().__init__()
        self.deep_supervision = deep_supervision
        chans, n = encoder.output_channels, len(encoder.output_channels)
        self.upsample_layers = nn.ModuleList(
            UpsampleProject(settings.conv_op, chans[-s], chans[-(s + 1)], encoder.strides[-s])
            for s in range(1, n))
        self.stages = nn.ModuleList(
            settings.stage(2 * chans[-(s + 1)], chans[-(s + 1)], encoder.kernel_sizes[-(s + 1)], 1,
                           n_conv_per_stage[s - 1]) for s in range(1, n))
        self.seg_layers = nn.ModuleList(
            settings.conv_op(chans[-(s + 1)], num_classes, 1) for s in range(1, n))

    def forward(self, skips: Sequence[torch.Tensor]):
        x, outs = skips[-1], []
        last = len(self.stages) - 1
        for s, (up, stage, head) in enumerate(zip(self.upsample_layers, self.stages, self.seg_layers)):
            x = stage(torch.cat([up(x), skips[-(s + 2)]], dim=1))
            if self.deep_supervision or s == last:
                outs.append(head(x))
        return outs[::-1] if self.deep_supervision else outs[-1]


class UMamba(nn.Module):
    """U-Mamba on the plans' U-Net: :class:`UMambaEncoder` + :class:`UMambaDecoder`.

    Arguments as dynamic_network_architectures' U-Nets (``n_blocks_per_stage`` encoder blocks
    per stage, before U-Mamba's reduction to one block in the deeper half), plus ``patch_size``
    (the plans' patch; used by U-Mamba Enc's channel-token layers). Input (B, input_channels,
    D, H, W), sizes divisible by the product of the strides; with 2D plans (conv_op Conv2d: the
    public code's ``UMambaBot_2d`` / ``UMambaEnc_2d``) (B, input_channels, H, W), Mamba over the
    H x W tokens. Output: logits (B, num_classes,
    D, H, W), or with ``deep_supervision`` a list of ``n_stages - 1`` maps, finest first.
    Subclasses fix where the Mamba layers sit (``mamba_stages``).
    """

    mamba_stages = "all"
    channel_tokens = False

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: type, kernel_sizes, strides, n_blocks_per_stage: Union[int, Sequence[int]],
                 num_classes: int, n_conv_per_stage_decoder: Union[int, Sequence[int]],
                 conv_bias: bool = True, norm_op: type = nn.InstanceNorm3d,
                 norm_op_kwargs: Optional[dict] = None, dropout_op: Optional[type] = None,
                 dropout_op_kwargs: Optional[dict] = None, nonlin: type = nn.LeakyReLU,
                 nonlin_kwargs: Optional[dict] = None, deep_supervision: bool = False,
                 patch_size: Optional[Sequence[int]] = None):
        super().__init__()
        if conv_op not in (nn.Conv2d, nn.Conv3d):
            raise ValueError(f"{type(self).__name__} needs conv_op Conv2d or Conv3d, got {conv_op}")
        if dropout_op is not None:
            raise ValueError("U-Mamba has no dropout; use plans without dropout_op")
        if self.channel_tokens and patch_size is None:
            raise ValueError(f"{type(self).__name__} needs the plans' patch_size")
        blocks = list(n_blocks_per_stage) if not isinstance(n_blocks_per_stage, int) \
            else [n_blocks_per_stage] * n_stages
        dec = list(n_conv_per_stage_decoder) if not isinstance(n_conv_per_stage_decoder, int) \
            else [n_conv_per_stage_decoder] * (n_stages - 1)
        # U-Mamba's reduction: one block in the deeper half of the encoder, one in the finest
        # decoder stages
        for s in range(math.ceil(n_stages / 2), n_stages):
            blocks[s] = 1
        for s in range(math.ceil((n_stages - 1) / 2 + 0.5), n_stages - 1):
            dec[s] = 1
        settings = _ConvSettings(conv_op, conv_bias, norm_op,
                                 {"eps": 1e-5, "affine": True} if norm_op_kwargs is None else norm_op_kwargs,
                                 nonlin, {"inplace": True} if nonlin_kwargs is None else nonlin_kwargs)
        self.encoder = UMambaEncoder(input_channels, features_per_stage, kernel_sizes, strides,
                                     blocks, settings, stage_flags(n_stages, self.mamba_stages),
                                     patch_size if self.channel_tokens else None)
        self.decoder = UMambaDecoder(self.encoder, num_classes, dec, settings, deep_supervision)
        self.apply(InitWeights_He(1e-2))

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, **overrides) -> "UMamba":
        """The network for an nnU-Net plans configuration, 2D or 3D (architecture kwargs and
        patch size)."""
        kwargs = {**unet_kwargs_from_plans(configuration_manager),
                  "patch_size": list(configuration_manager.patch_size), **overrides}
        return cls(num_input_channels, num_classes=num_output_channels,
                   deep_supervision=deep_supervision, **kwargs)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))


class UMambaBot(UMamba):
    """U-Mamba Bot (Ma et al. 2024): one Mamba layer (LayerNorm + Mamba over the bottleneck
    voxels, no residual) between encoder and decoder. 42.1 M parameters at BraTS plans."""

    mamba_stages = "bottleneck"


class UMambaEnc(UMamba):
    """U-Mamba Enc (Ma et al. 2024): a Mamba layer after every encoder stage, the
    full-resolution one included; channels become the tokens where a stage's map (at the
    plans' patch size) has no more voxels than channels. 42.8 M parameters at BraTS plans."""

    mamba_stages = "all"
    channel_tokens = True
