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

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .blocks import ConvOps, Size, crop_to, pad_to_multiple
from .from_plans import plans_levels
from .nnmamba_backbone import ResMambaEncoder, SkipScaledDecoder, level_sizes

#: nnMamba's depth: a stem and three residual stages, i.e. four down-samplings
NNMAMBA_LEVELS = 4
#: channels-last activations: None = for CUDA inputs in eager mode (see :class:`nnMambaSeg`)
CHANNELS_LAST_DEFAULT: Optional[bool] = None


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
    (nnU-Net's InstanceNorm). ``channels_last``: the activations in the channels-last
    layout (cuDNN's native one for float16 convolutions; the Mamba's raster-order tokens are
    then views): True, False, or None = for CUDA inputs in eager mode (the default; under
    ``torch.compile`` Inductor's own layout choice is faster: on an H200 channels-last made
    the eager step ~9 % faster and the compiled one 40 % slower,
    bench_results/h200_session3_speed.log). The same
    numbers either way. At in_channels=1, num_classes=16: 15.6 M parameters (paper:
    15.55 M); see ``scripts/model_size.py``.
    """

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 32,
                 blocks_per_stage: int = 3, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, deep_supervision: bool = False,
                 strides: Optional[Sequence[Size]] = None,
                 kernel_sizes: Optional[Sequence[Size]] = None, spatial_dims: int = 3,
                 norm: str = "batch", channels_last: Optional[bool] = CHANNELS_LAST_DEFAULT):
        super().__init__()
        ops = ConvOps.create(spatial_dims, norm)
        strides, kernels = level_sizes(strides, kernel_sizes, NNMAMBA_LEVELS, spatial_dims)
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
        #: activations in the channels-last layout: True, False, or None = on CUDA tensors
        self.channels_last = channels_last
        self._channels_last_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last

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
        if self.channels_last or (self.channels_last is None and x.is_cuda
                                  and not torch.compiler.is_compiling()):
            x = x.contiguous(memory_format=self._channels_last_format)
        out = self.decoder(self.encoder(x))
        if isinstance(out, torch.Tensor):
            return crop_to(out, shape)
        return [crop_to(o, [round(s * f) for s, f in zip(shape, scale)])
                for o, scale in zip(out, self.ds_scales)]
