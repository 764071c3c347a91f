"""The Taming Mambas networks (Lumetti et al., "Taming Mambas for Voxel Level 3D Medical Image
Segmentation", 2024; github.com/LucaLumetti/TamingMambas), written for nnunet-mamba.

All four are nnU-Net's residual U-Net built from the plans (dynamic_network_architectures'
``ResidualEncoder`` with the plans' stages, widths, kernels, strides and block counts, and
its ``UNetResDecoder`` with transposed convolutions, residual blocks and deep-supervision
heads) with Mamba layers added (Sec. 3, Fig. 2):

* :class:`TamingSegMamba` - a unidirectional Mamba layer (Fig. 1a) after every encoder stage
  (called "SegMamba" in the paper; renamed here so that it cannot be confused with Xing et
  al.'s :class:`~nnunet_mamba.networks.segmamba.SegMamba`);
* :class:`BiSegMamba` - a bidirectional layer (Fig. 1b: forward and reversed sequence,
  separate weights) after every encoder stage;
* :class:`MultiSegMamba` - after every encoder stage, bidirectional layers on four of the six
  axis permutations, averaged (Fig. 3);
* :class:`SegMambaSkip` - the encoder stays convolutional; bidirectional layers sit in the
  skip connections and on the bottleneck (Fig. 2, grey arrows).

Which stages get Mamba layers: all of them, the full-resolution stage included - the
paper's point is voxel-level Mamba (the public code does the same). At a 128^3 patch that is
a 2-million-token sequence per layer; ``mamba_stages`` can restrict the layers (e.g.
``(False, True, True, True, True, True)``) for smaller GPUs, at the price of a different network.

Mamba settings of the public code: ``d_state = min(C, 256)`` (MultiSegMamba: ``min(C, 64)``),
``d_conv`` 4, ``expand`` 2; each layer runs in float32 with autocast off. Weights are
initialised as nnU-Net's residual U-Net (He init, last norm of each residual block zero).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder
from dynamic_network_architectures.initialization.weight_init import (InitWeights_He,
                                                                      init_last_bn_before_add_to_0)

from ..ssm import AXIS_PERMUTATIONS, FORWARD, INTER_SLICE
from .mamba_layers import (BidirectionalMambaBlock, FeatureMapMamba, MambaAfterStagesMixin,
                           PreNormMambaBlock, stage_flags)
from .from_plans import unet_kwargs_from_plans


class MambaResidualEncoder(MambaAfterStagesMixin, ResidualEncoder):
    """nnU-Net's residual encoder (dynamic_network_architectures ``ResidualEncoder``) with a
    Mamba layer after each stage, or only on each stage's skip (``mamba_on_skips_only``).

    ``mamba_layers``: one module (or None) per stage. Takes ``ResidualEncoder``'s keyword
    arguments; always returns the skips, highest resolution first.
    (B, C_in, D, H, W) -> [(B, features_per_stage[s], D / prod(strides[:s+1]), ...)].
    """

    def __init__(self, mamba_layers: Sequence[Optional[nn.Module]],
                 mamba_on_skips_only: bool = False, **encoder_kwargs):
        super().__init__(return_skips=True, **encoder_kwargs)
        if len(mamba_layers) != len(self.stages):
            raise ValueError(f"one Mamba layer (or None) per stage: {len(self.stages)} stages, "
                             f"{len(mamba_layers)} layers")
        self.mamba_layers = nn.ModuleList(m if m is not None else nn.Identity() for m in mamba_layers)
        self.mamba_on_skips_only = mamba_on_skips_only


class TamingMambaUNet(nn.Module):
    """Residual U-Net of the plans with Taming Mambas layers (Lumetti et al. 2024, Fig. 2).

    Arguments as dynamic_network_architectures' ``ResidualEncoderUNet`` (``n_blocks_per_stage``
    encoder residual blocks per stage, ``n_conv_per_stage_decoder`` decoder blocks), plus
    ``mamba_stages`` (None = every stage, or one bool per stage), ``d_conv`` and ``expand``.
    Subclasses choose the layer (:meth:`mamba_layer`) and where it sits.

    Input (B, input_channels, D, H, W), sizes divisible by the product of the strides; with
    2D plans (conv_op Conv2d, nnU-Net's ``2d`` configuration) (B, input_channels, H, W) and the
    Mamba layers run over the H x W tokens.
    Output: logits (B, num_classes, D, H, W); with ``deep_supervision`` a list of
    ``n_stages - 1`` logit maps, highest resolution first, at the resolutions nnU-Net's
    deep-supervision loss expects (``decoder.deep_supervision`` is nnU-Net's switch).
    """

    mamba_on_skips_only = False

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: type, kernel_sizes, strides, n_blocks_per_stage: Union[int, Sequence[int]],
                 num_classes: int, n_conv_per_stage_decoder: Union[int, Sequence[int]],
                 conv_bias: bool = True, norm_op: Optional[type] = nn.InstanceNorm3d,
                 norm_op_kwargs: Optional[dict] = None, dropout_op: Optional[type] = None,
                 dropout_op_kwargs: Optional[dict] = None, nonlin: Optional[type] = nn.LeakyReLU,
                 nonlin_kwargs: Optional[dict] = None, deep_supervision: bool = False,
                 mamba_stages=None, d_conv: int = 4, expand: int = 2):
        super().__init__()
        if conv_op not in (nn.Conv2d, nn.Conv3d):
            raise ValueError(f"{type(self).__name__} needs conv_op Conv2d or Conv3d, got {conv_op}")
        self.d_conv, self.expand = d_conv, expand
        self.spatial_dims = 3 if conv_op is nn.Conv3d else 2
        flags = stage_flags(n_stages, mamba_stages)
        norm_op_kwargs = {"eps": 1e-5, "affine": True} if norm_op_kwargs is None else norm_op_kwargs
        nonlin_kwargs = {"inplace": True} if nonlin_kwargs is None else nonlin_kwargs
        self.encoder = MambaResidualEncoder(
            [self.mamba_layer(c) if f else None for c, f in zip(features_per_stage, flags)],
            self.mamba_on_skips_only, input_channels=input_channels, n_stages=n_stages,
            features_per_stage=features_per_stage, conv_op=conv_op, kernel_sizes=kernel_sizes,
            strides=strides, n_blocks_per_stage=n_blocks_per_stage, conv_bias=conv_bias,
            norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
            dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        self.decoder = UNetResDecoder(self.encoder, num_classes, n_conv_per_stage_decoder,
                                      deep_supervision)
        self.apply(InitWeights_He(1e-2))
        self.apply(init_last_bn_before_add_to_0)

    def mamba_layer(self, channels: int) -> nn.Module:
        """The Mamba layer of a stage with ``channels`` channels."""
        raise NotImplementedError

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, **overrides) -> "TamingMambaUNet":
        """The network for an nnU-Net plans configuration, 2D or 3D (stages, widths, kernels,
        strides, block counts, conv, norm and nonlinearity from ``network_arch_init_kwargs``)."""
        kwargs = {**unet_kwargs_from_plans(configuration_manager), **overrides}
        return cls(num_input_channels, num_classes=num_output_channels,
                   deep_supervision=deep_supervision, **kwargs)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))


class TamingSegMamba(TamingMambaUNet):
    """Taming Mambas' "SegMamba": a unidirectional Mamba layer (LayerNorm, then
    :class:`~nnunet_mamba.networks.mamba_layers.PreNormMambaBlock`) after every encoder stage
    of the plans' residual U-Net (Lumetti et al. 2024, Sec. 3, Figs. 1a, 2). 61.4 M parameters
    at BraTS plans (4 inputs, 128^3)."""

    def mamba_layer(self, channels: int) -> nn.Module:
        return FeatureMapMamba(channels, [PreNormMambaBlock(channels, d_conv=self.d_conv,
                                                            expand=self.expand)])


class BiSegMamba(TamingMambaUNet):
    """BiSegMamba: a bidirectional Mamba layer (LayerNorm, then
    :class:`~nnunet_mamba.networks.mamba_layers.BidirectionalMambaBlock`: forward and reversed
    scans with separate weights) after every encoder stage (Lumetti et al. 2024, Figs. 1b, 2)."""

    def mamba_layer(self, channels: int) -> nn.Module:
        return FeatureMapMamba(channels, [BidirectionalMambaBlock(channels, d_conv=self.d_conv,
                                                                  expand=self.expand)])


class MultiSegMamba(TamingMambaUNet):
    """MultiSegMamba: after every encoder stage, four bidirectional Mamba layers, one on each of
    four of the six axis permutations (the public code's: DHW, DWH, HDW, WDH), their outputs
    averaged (Lumetti et al. 2024, Fig. 3). No LayerNorm before the layers and Mamba
    ``d_state = min(C, 64)``, as the public code. On 2D plans the two axis permutations of an
    image (row- and column-major, :data:`~nnunet_mamba.ssm.FORWARD` and
    :data:`~nnunet_mamba.ssm.INTER_SLICE` read in 2D) with a bidirectional layer each."""

    permutations = tuple(AXIS_PERMUTATIONS[i] for i in (0, 1, 2, 4))
    permutations_2d = (FORWARD, INTER_SLICE)

    def mamba_layer(self, channels: int) -> nn.Module:
        orders = self.permutations if self.spatial_dims == 3 else self.permutations_2d
        mixers = [BidirectionalMambaBlock(channels, min(channels, 64), self.d_conv, self.expand)
                  for _ in orders]
        return FeatureMapMamba(channels, mixers, orders, input_norm=False)


class SegMambaSkip(BiSegMamba):
    """SegMambaSkip: the encoder stays convolutional; a bidirectional Mamba layer processes
    each skip connection and the bottleneck (Lumetti et al. 2024, Fig. 2, grey arrows)."""

    mamba_on_skips_only = True
