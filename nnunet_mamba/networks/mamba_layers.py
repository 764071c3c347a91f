"""Mamba layers over 3D feature maps, shared by the SegMamba, Taming Mambas and U-Mamba networks.

A feature map (B, C, D, H, W) is read as a token sequence with :mod:`nnunet_mamba.ssm`'s scan
orders, layer-normalised, mixed by one or more Mamba blocks and written back:

* :class:`FeatureMapSequenceMixer`: the common frame (tokens, LayerNorm, residual, float32
  with autocast off); subclasses say how the tokens are mixed.
* :class:`FeatureMapMamba`: one token mixer per scan order, outputs averaged. With a plain
  :class:`~nnunet_mamba.ssm.Mamba` and the raster order it is U-Mamba's Mamba layer (Ma et al.
  2024, Sec. 2.1); with :class:`PreNormMambaBlock` / :class:`BidirectionalMambaBlock` and the
  axis permutations, the layers of Taming Mambas (Lumetti et al. 2024, Sec. 3, Figs. 1, 3).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..ssm import FORWARD, Mamba, ScanOrder, from_sequence, to_sequence
from ..ssm.mamba import grouped_mamba
from ..ssm.ops import autocast_off


class PreNormMambaBlock(nn.Module):
    """Taming Mambas' unidirectional Mamba layer on a token sequence (Lumetti et al. 2024, Fig. 1a).

    ``x = x + Mamba(LN(x)); x = x + Linear(LN(x))`` (the public code's ``MambaTrans``).
    (B, L, C) -> (B, L, C). ``d_state`` defaults to ``min(C, 256)`` as in the public code.
    """

    def __init__(self, d_model: int, d_state: Optional[int] = None, d_conv: int = 4,
                 expand: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mamba = Mamba(d_model, d_state=d_state or min(d_model, 256), d_conv=d_conv,
                           expand=expand)
        self.norm2 = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mamba(self.norm1(x))
        return x + self.head(self.norm2(x))

    @staticmethod
    def run_many(blocks: Sequence["PreNormMambaBlock"], inputs: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
        """``[blk(x) for blk, x in zip(blocks, inputs)]`` with the Mambas as one grouped scan
        (:func:`~nnunet_mamba.ssm.mamba.grouped_mamba`); blocks of one configuration."""
        mixed = grouped_mamba([blk.mamba for blk in blocks],
                              [blk.norm1(x) for blk, x in zip(blocks, inputs)])
        xs = [x + m for x, m in zip(inputs, mixed)]
        return [x + blk.head(blk.norm2(x)) for blk, x in zip(blocks, xs)]


class BidirectionalMambaBlock(nn.Module):
    """Bidirectional Mamba layer (Lumetti et al. 2024, Fig. 1b): two :class:`PreNormMambaBlock`
    with their own weights, one on the sequence and one on the reversed sequence (its output
    reversed back), summed and layer-normalised. (B, L, C) -> (B, L, C).
    """

    def __init__(self, d_model: int, d_state: Optional[int] = None, d_conv: int = 4,
                 expand: int = 2):
        super().__init__()
        self.fwd_mamba = PreNormMambaBlock(d_model, d_state, d_conv, expand)
        self.bwd_mamba = PreNormMambaBlock(d_model, d_state, d_conv, expand)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_many([self], [x])[0]

    @staticmethod
    def run_many(blocks: Sequence["BidirectionalMambaBlock"], inputs: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
        """``[blk(x) for blk, x in zip(blocks, inputs)]``: all 2 x len(blocks) directions as
        one grouped scan."""
        pre = [p for blk in blocks for p in (blk.fwd_mamba, blk.bwd_mamba)]
        ys = PreNormMambaBlock.run_many(pre, [t for x in inputs for t in (x, x.flip(1))])
        return [blk.norm(ys[2 * i] + ys[2 * i + 1].flip(1)) for i, blk in enumerate(blocks)]


class FeatureMapSequenceMixer(nn.Module):
    """Run a token mixer over a feature map: (B, C, D, H, W) -> (B, C, D, H, W), or
    (B, C, H, W) -> (B, C, H, W) (2D maps are read as :mod:`~nnunet_mamba.ssm.scan_orders`
    says: the orders' 2D forms, Mamba over the H x W tokens).

    The map is read in raster order (:func:`~nnunet_mamba.ssm.to_sequence`), optionally
    layer-normalised over channels, mixed by :meth:`mix` and written back; ``residual`` adds the
    input. With ``channel_tokens`` the C channels are the tokens and the ``num_voxels`` voxels
    their features (U-Mamba Enc's layer for maps with no more voxels than channels); the map
    must then have exactly ``num_voxels`` voxels. With ``fp32`` (U-Mamba, Taming Mambas) the
    layer runs in float32 with autocast off; otherwise only the selective scan does.
    """

    def __init__(self, channels: int, input_norm: bool = True, residual: bool = False,
                 fp32: bool = True, num_voxels: Optional[int] = None):
        super().__init__()
        self.channels, self.residual, self.fp32 = channels, residual, fp32
        self.num_voxels = num_voxels
        self.channel_tokens = num_voxels is not None
        self.token_dim = num_voxels if self.channel_tokens else channels
        self.norm = nn.LayerNorm(self.token_dim) if input_norm else None

    def mix(self, tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """(B, L, d) in raster order -> (B, L, d) in raster order."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (4, 5) or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__}: expected (B, {self.channels}, D, H, W) or "
                             f"(B, {self.channels}, H, W), got {tuple(x.shape)}")
        shape = tuple(x.shape[2:])
        if self.channel_tokens and x[0, 0].numel() != self.num_voxels:
            raise ValueError(
                f"{type(self).__name__} was built with channel tokens for feature maps of "
                f"{self.num_voxels} voxels (from the plans' patch size) but got a {shape} map; "
                "run the network on the patch size of the plans it was built from")
        with autocast_off(x.device) if self.fp32 else contextlib.nullcontext():
            if self.fp32 and x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            seq = to_sequence(x)
            if self.channel_tokens:
                seq = seq.transpose(1, 2)
            h = self.norm(seq) if self.norm is not None else seq
            y = self.mix(h, shape)
            if self.channel_tokens:
                y = y.transpose(1, 2)
            out = from_sequence(y, shape)
            return x + out if self.residual else out


class FeatureMapMamba(FeatureMapSequenceMixer):
    """Mamba layer over a feature map: ``mixers[i]`` reads the map in ``orders[i]``, the
    outputs are put back in raster order and averaged. (B, C, D, H, W) -> (B, C, D, H, W).

    * U-Mamba (Ma et al. 2024, Sec. 2.1): ``[Mamba(C)]``, raster order, input LayerNorm.
    * Taming Mambas (Lumetti et al. 2024, Sec. 3): ``[PreNormMambaBlock(C)]`` (SegMamba),
      ``[BidirectionalMambaBlock(C)]`` (BiSegMamba, SegMambaSkip), or four bidirectional
      blocks on four of the six axis permutations, without input norm (MultiSegMamba, Fig. 3).

    Every mixer maps (B, L, d) -> (B, L, d); see :class:`FeatureMapSequenceMixer` for the
    options. The orders' index permutations come from the actual map size, so any patch works.
    """

    def __init__(self, channels: int, mixers: Sequence[nn.Module],
                 orders: Sequence[ScanOrder] = (FORWARD,), input_norm: bool = True,
                 residual: bool = False, fp32: bool = True, num_voxels: Optional[int] = None):
        super().__init__(channels, input_norm, residual, fp32, num_voxels)
        if len(mixers) != len(orders) or not mixers:
            raise ValueError(f"one mixer per scan order: {len(mixers)} mixers, {len(orders)} orders")
        if num_voxels is not None and tuple(orders) != (FORWARD,):
            raise ValueError("channel tokens are read in one order only")
        self.mixers = nn.ModuleList(mixers)
        self.orders = tuple(orders)

    def mix(self, tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        perms = [None if order == FORWARD else order.permutation(spatial_shape, device=tokens.device)
                 for order in self.orders]
        seqs = [tokens if p is None else tokens[:, p] for p in perms]
        kind = type(self.mixers[0])
        if len(self.mixers) > 1 and hasattr(kind, "run_many") and all(
                type(m) is kind for m in self.mixers):
            ys = kind.run_many(list(self.mixers), seqs)  # all orders in one grouped scan
        else:
            ys = [mixer(s) for mixer, s in zip(self.mixers, seqs)]
        out = 0
        for y, p in zip(ys, perms):
            out = out + (y if p is None else torch.empty_like(y).index_copy_(1, p, y))
        return out / len(self.mixers)


# ---- encoders ----------------------------------------------------------------------------
class MambaAfterStagesMixin:
    """Forward pass of a U-Net encoder with a Mamba layer after each stage (mixin).

    The encoder provides ``stem`` (or None), ``stages`` and ``mamba_layers`` (one module per
    stage, ``nn.Identity`` where a stage has none) and ``mamba_on_skips_only``. Input
    (B, C, D, H, W); returns the skips, highest resolution first, the bottleneck last. Each
    stage output goes through its Mamba layer; with ``mamba_on_skips_only`` only the skip
    does and the next stage sees the convolutional features (Taming Mambas' SegMambaSkip).
    """

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage, mamba in zip(self.stages, self.mamba_layers):
            x = stage(x)
            if self.mamba_on_skips_only:
                skips.append(mamba(x))
            else:
                x = mamba(x)
                skips.append(x)
        return skips


def stage_flags(n_stages: int, mamba_stages) -> list[bool]:
    """Which stages get a Mamba layer: None or 'all' = every stage, 'bottleneck' = the last,
    or one bool per stage."""
    if mamba_stages is None or mamba_stages == "all":
        return [True] * n_stages
    if mamba_stages == "bottleneck":
        return [False] * (n_stages - 1) + [True]
    flags = [bool(f) for f in mamba_stages]
    if len(flags) != n_stages:
        raise ValueError(f"mamba_stages needs one flag per stage ({n_stages}), got {len(flags)}")
    return flags
