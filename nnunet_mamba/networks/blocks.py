"""Building blocks shared by the nnMamba networks (segmentation, landmarks, classification).

Architectures in this package compose these blocks; none re-implements them. Tensor
shapes use (B, C, D, H, W); every block also runs on 2D maps (B, C, H, W) when built with
2D :class:`ConvOps` (convolution and norm types of one dimensionality, chosen as
dynamic_network_architectures takes them from nnU-Net's plans). Kernel sizes and strides
are an int or one value per spatial axis (nnU-Net's anisotropic ``conv_kernel_sizes`` and
``pool_op_kernel_sizes``). Paper references are to Gong et al., "nnMamba: 3D Biomedical
Image Segmentation, Classification and Landmark Detection with State Space Model" (2024).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm import MICCSS_FLIPS, Mamba, memory_format_of

Size = Union[int, Sequence[int]]


class _BiasCorrectedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose eval-mode statistics are bias-corrected for their initial values.

    PyTorch's running statistics start at mean 0 / variance 1 and move towards the batch
    statistics by ``momentum`` (0.1) per training step, so after n steps they still hold a
    share ``(1 - momentum) ** n`` of those initial values: 81 % after two steps. On real
    data whose activations have a variance far from 1, eval mode then scales every stage
    wrongly and the logits explode (nnunet-mamba issue 13: ~1e9 after two iterations,
    nnU-Net's predictor aborts on inf). This module tracks that share in the buffer
    ``init_share`` and, in eval mode, removes it (as Adam corrects its moment estimates):
    ``mean = running_mean / (1 - s)``, ``var = (running_var - s) / (1 - s)``, i.e. the
    momentum-weighted average of the batch statistics seen so far. Training mode is
    PyTorch's BatchNorm unchanged; after ~50 steps (s < 0.6 %) eval mode is too, so a full
    training gives the paper's network. No data access, no Python-side state: safe under
    DDP and ``torch.compile``. State dicts without ``init_share`` (trained before this
    module existed) load with ``init_share = 0`` (statistics taken as they are).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if track_running_stats:
            self.register_buffer("init_share", torch.ones((), device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.track_running_stats:
            return super().forward(x)
        if self.training:
            with torch.no_grad():
                if self.momentum is None:  # cumulative average: the init values go at once
                    self.init_share.zero_()
                else:
                    self.init_share.mul_(1.0 - self.momentum)
            return super().forward(x)
        self._check_input_dim(x)
        s = self.init_share
        keep = (1.0 - s).clamp_min(1e-12)
        trained = s < 1.0  # untouched statistics stay as they are
        mean = torch.where(trained, self.running_mean / keep, self.running_mean)
        var = torch.where(trained, ((self.running_var - s) / keep).clamp_min(0.0), self.running_var)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "init_share"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class BiasCorrectedBatchNorm2d(_BiasCorrectedBatchNorm, nn.BatchNorm2d):
    """:class:`_BiasCorrectedBatchNorm` on (B, C, H, W)."""


class BiasCorrectedBatchNorm3d(_BiasCorrectedBatchNorm, nn.BatchNorm3d):
    """:class:`_BiasCorrectedBatchNorm` on (B, C, D, H, W)."""


@dataclass(frozen=True)
class ConvOps:
    """Convolution and norm types of one spatial dimensionality, as nnU-Net's plans give them
    to dynamic_network_architectures (``conv_op``, ``norm_op``, ``norm_op_kwargs``)."""

    conv: type = nn.Conv3d
    norm: type = nn.BatchNorm3d
    norm_kwargs: tuple = ()  # (name, value) pairs: hashable
    conv_transpose: type = field(init=False)

    def __post_init__(self):
        if self.conv not in (nn.Conv2d, nn.Conv3d):
            raise ValueError(f"conv must be nn.Conv2d or nn.Conv3d, got {self.conv}")
        object.__setattr__(self, "conv_transpose",
                           nn.ConvTranspose3d if self.conv is nn.Conv3d else nn.ConvTranspose2d)

    @property
    def dim(self) -> int:
        return 3 if self.conv is nn.Conv3d else 2

    def make_norm(self, channels: int) -> nn.Module:
        return self.norm(channels, **dict(self.norm_kwargs))

    @staticmethod
    def create(dim: int, norm: str = "batch") -> "ConvOps":
        """``dim`` 2 or 3; ``norm`` 'batch' (:class:`_BiasCorrectedBatchNorm`), 'batch_plain'
        (PyTorch's BatchNorm), 'instance' (nnU-Net's: InstanceNorm, affine, eps 1e-5) or
        'instance_plain' (InstanceNorm without affine parameters, MONAI's / SegMamba's)."""
        if dim not in (2, 3):
            raise ValueError(f"2D or 3D networks only, got dim={dim}")
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        norms = {
            "batch": ((BiasCorrectedBatchNorm2d, BiasCorrectedBatchNorm3d), ()),
            "batch_plain": ((nn.BatchNorm2d, nn.BatchNorm3d), ()),
            "instance": ((nn.InstanceNorm2d, nn.InstanceNorm3d), (("eps", 1e-5), ("affine", True))),
            "instance_plain": ((nn.InstanceNorm2d, nn.InstanceNorm3d), ()),
        }
        if norm not in norms:
            raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(norms)}")
        types, kwargs = norms[norm]
        return ConvOps(conv, types[dim - 2], kwargs)


#: nnMamba's 3D convolutions with PyTorch's BatchNorm (classification, landmarks)
OPS_3D = ConvOps()


def per_axis(value: Size, dim: int) -> tuple[int, ...]:
    """An int or a per-axis sequence as a tuple of ``dim`` ints."""
    if isinstance(value, int):
        return (value,) * dim
    out = tuple(int(v) for v in value)
    if len(out) != dim:
        raise ValueError(f"expected {dim} values (one per spatial axis), got {list(value)}")
    return out


class ConvNormAct(nn.Sequential):
    """Conv -> norm (BatchNorm by default) -> ReLU (the activation optional).

    (B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride); 2D with 2D
    ``ops``. ``kernel_size`` and ``stride``: an int or one per axis ('same' padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size = 3,
                 stride: Size = 1, act: bool = True, bias: bool = False, ops: ConvOps = OPS_3D):
        kernel = per_axis(kernel_size, ops.dim)
        layers = [ops.conv(in_channels, out_channels, kernel, stride=per_axis(stride, ops.dim),
                           padding=[k // 2 for k in kernel], bias=bias),
                  ops.make_norm(out_channels)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two ConvNormAct (3x3x3 by default); the first may be strided (the nnMamba stem).

    (B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Size = 1,
                 kernel_size: Size = 3, ops: ConvOps = OPS_3D):
        super().__init__(ConvNormAct(in_channels, out_channels, kernel_size, stride, ops=ops),
                         ConvNormAct(out_channels, out_channels, kernel_size, ops=ops))


class MICCSS(nn.Module):
    """Mamba-In-Convolution with Channel-Spatial Siamese learning (paper Sec. 2.2, Fig. 1).

    1x1 ConvNormAct; one Mamba run on the voxel sequence and on its channel-flipped,
    sequence-flipped and doubly flipped copies (siamese: the same weights), each output
    flipped back, the four averaged and added to the conv features; 1x1 ConvNormAct.
    The sequences come from :data:`nnunet_mamba.ssm.MICCSS_FLIPS`; the views are stacked
    along the batch axis, so the Mamba runs once on (views x B, L, C).

    (B, C, D, H, W) -> (B, C, D, H, W); with 2D ``ops`` (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 views=MICCSS_FLIPS, ops: ConvOps = OPS_3D):
        super().__init__()
        self.proj_in = ConvNormAct(channels, channels, kernel_size=1, ops=ops)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj_out = ConvNormAct(channels, channels, kernel_size=1, ops=ops)
        self.views = tuple(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        shape = x.shape[2:]
        n = len(self.views)
        # the siamese views stacked along the batch axis: one Mamba call for all of them
        ys = self.mamba(torch.cat([v.to_sequence(x) for v in self.views], 0)).chunk(n, 0)
        fmt = memory_format_of(x)  # channels-last maps: the raster view comes back as a view
        mixed = sum(v.from_sequence(y, shape, fmt) for v, y in zip(self.views, ys))
        return self.proj_out(x + mixed / n)


class ResidualBlock(nn.Module):
    """Basic residual block (He et al. 2016) with an optional global branch (paper Sec. 2.2).

    out = ReLU(BN(conv(ReLU(BN(conv(x))))) + branch(x) + shortcut(x)); the branch (e.g. a
    :class:`MICCSS`) sees the block input, as in the Res-Mamba blocks of nnMamba.
    (B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Size = 1,
                 branch: Optional[nn.Module] = None, kernel_size: Size = 3,
                 ops: ConvOps = OPS_3D):
        super().__init__()
        strided = any(s != 1 for s in per_axis(stride, ops.dim))
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, stride, ops=ops)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel_size, act=False, ops=ops)
        self.branch = branch
        if strided or in_channels != out_channels:
            self.shortcut = ConvNormAct(in_channels, out_channels, 1, stride, act=False, ops=ops)
        else:
            self.shortcut = nn.Identity()
        if branch is not None and (strided or in_channels != out_channels):
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

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, stride: Size = 2,
                 shared_branch: Optional[nn.Module] = None, kernel_size: Size = 3,
                 ops: ConvOps = OPS_3D):
        blocks = [ResidualBlock(in_channels, out_channels, stride, kernel_size=kernel_size, ops=ops)]
        blocks += [ResidualBlock(out_channels, out_channels, 1, shared_branch, kernel_size, ops)
                   for _ in range(num_blocks - 1)]
        super().__init__(*blocks)


class ChannelScaling(nn.Module):
    """Squeeze-excitation weights of a skip feature (the paper's skip/channel scaling).

    Global average pool, C -> C/r -> C MLP, sigmoid; returns the skip multiplied by the
    weights. (B, C, D, H, W) -> (B, C, D, H, W), or (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=tuple(range(2, x.dim()))))
        return x * w.reshape(*w.shape, *([1] * (x.dim() - 2)))


def _linear_2x(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Linear interpolation doubling ``axis`` (align_corners=False): output 2i is
    0.75 x[i] + 0.25 x[i - 1], output 2i + 1 is 0.75 x[i] + 0.25 x[i + 1], edges clamped."""
    n = x.shape[axis]
    prev = torch.cat([x.narrow(axis, 0, 1), x.narrow(axis, 0, n - 1)], axis)
    nxt = torch.cat([x.narrow(axis, 1, n - 1), x.narrow(axis, n - 1, 1)], axis)
    pair = torch.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis + 1)
    return pair.flatten(axis, axis + 1)


def upsample_linear(x: torch.Tensor, size: Sequence[int], separable: Optional[bool] = None) -> torch.Tensor:
    """(Tri/bi)linear up-sampling of (B, C, *spatial) to ``size``, ``align_corners=False``:
    ``F.interpolate``'s numbers.

    Where every axis keeps its extent or doubles (the U-Net decoders' case), the compiled
    network computes it as one linear doubling per axis (``separable``, default: under
    ``torch.compile``): Inductor fuses that into its neighbours and its backward gathers,
    where the backward of ``F.interpolate``'s trilinear kernel scatters with atomics (2 ms of
    nnMambaSeg's 34 ms step on an H200). Eager keeps PyTorch's single kernel.
    """
    in_size = tuple(x.shape[2:])
    size = tuple(int(s) for s in size)
    if separable is None:
        separable = torch.compiler.is_compiling()
    if separable and len(size) == len(in_size) and all(o in (i, 2 * i) and i > 1 for i, o in zip(in_size, size)):
        dtype = x.dtype  # float16 / bfloat16 computed in float32, as PyTorch's kernel does
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        for axis, (i, o) in enumerate(zip(in_size, size)):
            if o == 2 * i:
                x = _linear_2x(x, axis + 2)
        return x.to(dtype)
    return F.interpolate(x, size=size, mode="trilinear" if len(size) == 3 else "bilinear",
                         align_corners=False)


class UpConcatBlock(nn.Module):
    """Trilinear (2D: bilinear) up-sampling to the skip's size, concatenation, :class:`DoubleConv`.

    (B, C_low, d, h, w), skip (B, C_skip, D, H, W) -> (B, out_channels, D, H, W).
    """

    def __init__(self, low_channels: int, skip_channels: int, out_channels: int,
                 kernel_size: Size = 3, ops: ConvOps = OPS_3D):
        super().__init__()
        self.conv = DoubleConv(low_channels + skip_channels, out_channels, 1, kernel_size, ops)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = upsample_linear(x, skip.shape[2:])
        return self.conv(torch.cat([x, skip], dim=1))


def pad_to_multiple(x: torch.Tensor, multiple: Size) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of (B, C, D, H, W) or (B, C, H, W) at their ends to a multiple
    of ``multiple`` (an int or one per axis).

    Returns the padded tensor and the original spatial shape (for :func:`crop_to`).
    """
    shape = tuple(x.shape[2:])
    pads = [(-s) % m for s, m in zip(shape, per_axis(multiple, len(shape)))]
    if any(pads):
        x = F.pad(x, [p for pad in reversed(pads) for p in (0, pad)])
    return x, shape


def crop_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Keep the first ``shape`` voxels of each spatial axis (undoes :func:`pad_to_multiple`)."""
    return x[(...,) + tuple(slice(0, int(s)) for s in shape)]
