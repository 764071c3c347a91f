"""nnMamba for 3D classification (Gong et al. 2024, Sec. 2.3, Table 2) and its 3D-ResNet baseline.

nnMambaCls = the residual encoder of :class:`~nnunet_mamba.networks.nnmamba_backbone.ResMambaEncoder`
with one Mamba layer right after the stem ("immediately following the initial feature
extraction", Sec. 2.3) and no Mamba in the stages, followed by *channel-sequential learning*
(abstract, Fig. 1): the globally pooled features of the last three scales are cut into
tokens of a common width along the channel axis (1, 2 and 4 tokens for 64, 128 and 256
channels: 7 tokens of width 64), a Mamba layer mixes the 7 tokens, and an MLP
(448 -> 32 -> n) gives the logits.

The channel split (rather than spatial pooling to 1/2/4 cells plus a projection) follows the
authors' public classifier (lhaof/nnMamba, ``nnMamba4cls.py``): each scale's pooled channel
vector is reshaped into 64-wide tokens, with no extra projection. Differences from that code:
the tokens are consecutive channel blocks (the public code interleaves channels, which is
the same up to a fixed permutation of channels), and the stem's Mamba layer is the MICCSS
of this package (four siamese views, Sec. 2.2) where the public code ran one forward scan.

:class:`ResNet3D` is the baseline of Table 2: the same stem and residual stages without any
Mamba, global average pooling of the last stage and the same MLP head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ssm import Mamba
from .nnmamba_backbone import ResMambaEncoder


class ChannelSequenceTokens(nn.Module):
    """Pooled multi-scale features as a channel-token sequence (paper: channel-sequential learning).

    Each feature map (B, C_i, D_i, H_i, W_i) is globally average-pooled to (B, C_i) and cut
    along channels into C_i / token_width consecutive tokens of width ``token_width``; the
    tokens of all scales are concatenated in the given order (coarse-to-fine order of the
    encoder's stages: shallow scale first).

    Input: a sequence of maps with ``channels[i]`` channels. Output: (B, T, token_width),
    T = sum(channels) / token_width (7 for channels 64/128/256 and width 64).
    """

    def __init__(self, channels: Sequence[int], token_width: int):
        super().__init__()
        bad = [c for c in channels if c % token_width]
        if bad:
            raise ValueError(f"channels {list(channels)} must be multiples of the token width "
                             f"{token_width}")
        self.channels = tuple(int(c) for c in channels)
        self.token_width = int(token_width)
        self.tokens_per_scale = tuple(c // token_width for c in self.channels)
        self.num_tokens = sum(self.tokens_per_scale)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} feature maps, got {len(features)}")
        tokens = [f.mean(dim=(2, 3, 4)).reshape(f.shape[0], n, self.token_width)
                  for f, n in zip(features, self.tokens_per_scale)]
        return torch.cat(tokens, dim=1)


class TokenMambaMixer(nn.Module):
    """Residual Mamba over a short token sequence: x + Mamba(ReLU(x)) (channel-sequential
    learning of nnMamba's classifier, Sec. 2.3; the public code's ``MambaSeq``).

    (B, T, C) -> (B, T, C).
    """

    def __init__(self, width: int, d_state: int = 8, d_conv: int = 2, expand: int = 2):
        super().__init__()
        self.act = nn.ReLU()
        self.mamba = Mamba(width, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.mamba(self.act(tokens))


class ClassificationHead(nn.Module):
    """MLP classifier: Linear -> ReLU -> Dropout -> Linear (448 -> 32 -> n in nnMamba).

    (B, in_features) -> logits (B, num_classes).
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class nnMambaCls(nn.Module):
    """nnMamba classifier (Gong et al. 2024, Sec. 2.3, Table 2).

    Input (B, in_channels, D, H, W), any size of at least 16 per axis (the encoder halves
    each axis four times). Output: logits (B, num_classes) (use softmax / cross-entropy).

    Stem: stride-2 :class:`DoubleConv` (``base_channels``) plus a MICCSS Mamba layer added
    residually (Sec. 2.3: Mamba right after the first feature extraction); three residual
    stages (2, 4, 8 x ``base_channels``, 1/4, 1/8, 1/16 resolution) without Mamba; the
    pooled stage outputs as 1 + 2 + 4 tokens of width 2 x ``base_channels``
    (:class:`ChannelSequenceTokens`), a residual :class:`TokenMambaMixer`, flattened
    (14 x ``base_channels`` = 448) and :class:`ClassificationHead` (448 -> ``base_channels``
    -> num_classes, dropout 0.5).

    Defaults are the authors' classifier: base width 32, 3 blocks per stage, stem Mamba
    d_state 8 / d_conv 4 / expand 2, token Mamba d_state 8 / d_conv 2 / expand 2.
    """

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 32,
                 blocks_per_stage: int = 3, d_state: int = 8, d_conv: int = 4, expand: int = 2,
                 seq_d_state: int = 8, seq_d_conv: int = 2, dropout: float = 0.5):
        super().__init__()
        widths = (2 * base_channels, 4 * base_channels, 8 * base_channels)
        self.encoder = ResMambaEncoder(in_channels, base_channels, widths, blocks_per_stage,
                                       mamba_stages=(False, False, False), stem_mamba=True,
                                       d_state=d_state, d_conv=d_conv, expand=expand)
        self.tokens = ChannelSequenceTokens(widths, token_width=widths[0])
        self.mixer = TokenMambaMixer(widths[0], d_state=seq_d_state, d_conv=seq_d_conv,
                                     expand=expand)
        self.head = ClassificationHead(self.tokens.num_tokens * widths[0], base_channels,
                                       num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(x)  # [stem, stage 1, stage 2, stage 3]
        tokens = self.mixer(self.tokens(skips[1:]))  # (B, 7, 2 * base)
        return self.head(tokens.flatten(1))


class ResNet3D(nn.Module):
    """3D-ResNet baseline of nnMamba's Table 2, built from the same blocks, no Mamba.

    Input (B, in_channels, D, H, W) (at least 16 per axis). Output: logits (B, num_classes).
    Stride-2 :class:`DoubleConv` stem, three residual stages (2, 4, 8 x ``base_channels``),
    global average pooling of the last stage (8 x ``base_channels`` = 256 features) and the
    same :class:`ClassificationHead` (256 -> ``base_channels`` -> num_classes) as
    :class:`nnMambaCls`. At the defaults (1 channel, 2 classes): 12.86 M parameters,
    nnMambaCls 12.91 M.
    """

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 32,
                 blocks_per_stage: int = 3, dropout: float = 0.5):
        super().__init__()
        widths = (2 * base_channels, 4 * base_channels, 8 * base_channels)
        self.encoder = ResMambaEncoder(in_channels, base_channels, widths, blocks_per_stage,
                                       mamba_stages=(False, False, False), stem_mamba=False)
        self.head = ClassificationHead(widths[-1], base_channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deepest = self.encoder(x)[-1]
        return self.head(deepest.mean(dim=(2, 3, 4)))
