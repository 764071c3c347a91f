"""nnMamba for 3D landmark detection and its residual U-Net baseline (Gong et al. 2024,
Sec. 2.2, Sec. 3.4, Table 3).

Both networks regress one heatmap per landmark at the input resolution (the paper trains
them with an MSE loss against Gaussian heatmaps; see :mod:`nnunet_mamba.landmarks`). They
share everything but the Mamba layer: the residual encoder of nnMamba
(:class:`~nnunet_mamba.networks.nnmamba_backbone.ResMambaEncoder`) and its convolutional decoder
with channel-scaled skips (:class:`~nnunet_mamba.networks.nnmamba_backbone.SkipScaledDecoder`,
no deep supervision).

"A singular Mamba layer at the first block of the network" (Sec. 2.2) is realised as one
MICCSS layer on the output of the stride-2 stem, added residually (``x + MICCSS(x)``), and
no Mamba in the three residual stages: the stem is the first block of the network, and
this is the place of the (commented-out) ``mamba_layer_stem`` of the authors' public
nnMamba code, which the encoder's ``stem_mamba`` option reproduces. Putting the layer into
the first residual stage instead would make it the second block; it would also act on
1/4-resolution features rather than on the 1/2-resolution features where the paper wants
long-range relations modelled "early on in the processing pipeline".
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import crop_to, pad_to_multiple
from .nnmamba_backbone import ResMambaEncoder, SkipScaledDecoder


class HeatmapUNet(nn.Module):
    """Residual encoder + skip-scaled convolutional decoder that outputs heatmaps.

    Input (B, in_channels, D, H, W) of any size: zero-padded at the end of each axis to a
    multiple of 16 and the output cropped back. Output (B, num_landmarks, D, H, W): one
    unbounded heatmap per landmark (no activation: the targets are regressed with MSE).

    ``stem_mamba`` puts one MICCSS layer after the stem (nnMamba's landmark network,
    Sec. 2.2); without it the network is a plain residual U-Net (the ResUNet of Table 3).
    Widths: ``base_channels`` in the stem, then 2x, 4x, 8x in the three stages. The 1x1
    heatmap head is zero-initialised (the paper gives no initialisation; this one lets the
    sparse peaks be learnt in tens rather than hundreds of steps); the decoder is built
    without deep-supervision heads (heatmaps are regressed at full resolution only).
    """

    def __init__(self, in_channels: int, num_landmarks: int, base_channels: int = 32,
                 blocks_per_stage: int = 3, stem_mamba: bool = True, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2):
        super().__init__()
        if num_landmarks < 1:
            raise ValueError("num_landmarks must be at least 1")
        widths = (2 * base_channels, 4 * base_channels, 8 * base_channels)
        self.encoder = ResMambaEncoder(in_channels, base_channels, widths, blocks_per_stage,
                                       mamba_stages=(False, False, False), stem_mamba=stem_mamba,
                                       d_state=d_state, d_conv=d_conv, expand=expand)
        self.decoder = SkipScaledDecoder(self.encoder.output_channels, num_landmarks,
                                         deep_supervision=False, ds_heads=False)
        # zero-initialised heatmap head: the output starts at 0, the value of almost every
        # target voxel, so the first updates follow the landmark peaks instead of shrinking
        # a random output (whose large early gradients would also inflate Adam's second
        # moments and slow the peaks' learning down for hundreds of steps)
        nn.init.zeros_(self.decoder.seg_head.weight)
        nn.init.zeros_(self.decoder.seg_head.bias)
        self.num_landmarks = num_landmarks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = pad_to_multiple(x, self.encoder.divisor)
        return crop_to(self.decoder(self.encoder(x)), shape)


class nnMambaLandmark(HeatmapUNet):
    """nnMamba landmark-detection network (Gong et al. 2024, Sec. 2.2, Table 3).

    (B, in_channels, D, H, W) -> heatmaps (B, num_landmarks, D, H, W). A single MICCSS
    Mamba layer (Mamba d_state 16, d_conv 4, expand 2) after the stride-2 stem, i.e. at the
    first block; residual stages without Mamba; SE-scaled skips; trilinear decoder. The
    paper's input is the volume resized to 128^3. Defaults: base width 32, stage widths
    64/128/256, 3 residual blocks per stage.
    """

    def __init__(self, in_channels: int, num_landmarks: int, base_channels: int = 32,
                 blocks_per_stage: int = 3, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2):
        super().__init__(in_channels, num_landmarks, base_channels, blocks_per_stage,
                         stem_mamba=True, d_state=d_state, d_conv=d_conv, expand=expand)


class ResUNetLandmark(HeatmapUNet):
    """Residual U-Net landmark baseline ("ResUNet" of Table 3): :class:`nnMambaLandmark`
    without its Mamba layer.

    (B, in_channels, D, H, W) -> heatmaps (B, num_landmarks, D, H, W).
    """

    def __init__(self, in_channels: int, num_landmarks: int, base_channels: int = 32,
                 blocks_per_stage: int = 3):
        super().__init__(in_channels, num_landmarks, base_channels, blocks_per_stage,
                         stem_mamba=False)
