"""The Mamba block (Gu & Dao 2023, Section 3.4 and Fig. 3), backend-independent.

:class:`Mamba` has the parameter names, shapes and initialisation of ``mamba_ssm.Mamba``
(``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so a
state_dict trained with mamba-ssm on a GPU loads into it on a CPU and gives the same
output. The depthwise causal convolution uses ``causal_conv1d`` on CUDA when it imports
(unless ``NNUNET_MAMBA_CAUSAL_CONV1D=0`` at import) and ``torch.nn.functional.conv1d``
otherwise; the selective scan goes through
:func:`nnunet_mamba.ssm.selective_scan` and always runs in float32, autocast or not.

:class:`MultiScanMamba` is the multi-directional variant SegMamba's Tri-orientated Mamba
uses (Xing et al. 2024, Sec. 2.2): one shared ``in_proj``/``out_proj`` and one set of
scan parameters (:class:`SSMBranch`) per scan order, the branch outputs summed; the
branches run side by side as one grouped scan (:func:`grouped_ssm`).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import autocast_off
from .selective_scan import selective_scan


try:  # imported once here, not per call: torch.compile then sees a constant
    from causal_conv1d import causal_conv1d_fn as _CAUSAL_CONV1D
except Exception:  # not installed, or built for another CUDA/torch
    _CAUSAL_CONV1D = None
if os.environ.get("NNUNET_MAMBA_CAUSAL_CONV1D", "1") == "0":  # benchmarks: F.conv1d instead
    _CAUSAL_CONV1D = None


class SSMBranch(nn.Module):
    """The selective-SSM half of a Mamba block: causal depthwise conv, SiLU, input-dependent
    (dt, B, C) projections and the selective scan gated by z.

    Input x, z: (batch, d_inner, L). Output: (batch, d_inner, L).
    Parameter names match ``mamba_ssm.Mamba`` (conv1d, x_proj, dt_proj, A_log, D).
    """

    def __init__(self, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 8,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 scan_backend: Optional[str] = None):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.scan_backend = scan_backend
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # mamba_ssm's initialisation: dt_proj keeps softplus(bias) in [dt_min, dt_max]
        std = dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.ssm(x, z)

    def ssm(self, x: torch.Tensor, z: torch.Tensor, fp32_out: bool = True) -> torch.Tensor:
        """x, z: (batch, d_inner, L) -> y (batch, d_inner, L).

        The scan runs in float32 whatever the input dtype. With ``fp32_out`` y is float32
        (float64 stays); without it y has the dtype of the projections (float16 under
        autocast): the same numbers as a float32 y cast for the next autocast matmul,
        without the float32 copies.
        """
        L = x.shape[-1]
        if x.is_cuda and _CAUSAL_CONV1D is not None:
            x = _CAUSAL_CONV1D(x.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                               activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :L])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias goes into the scan
        return _scan(x, dt, self.A_log, B.transpose(1, 2), C.transpose(1, 2), self.D, z,
                     self.dt_proj.bias, self.scan_backend, fp32_out)


def _scan(x, dt, A_log, B, C, D, z, dt_bias, backend, fp32_out):
    """The selective scan of SSM branches (softplus(dt + dt_bias), A = -exp(A_log))."""
    A = -torch.exp(A_log.float())
    work = torch.promote_types(x.dtype, torch.float32) if fp32_out else x.dtype
    with autocast_off(x.device):
        return selective_scan(
            x.to(work), dt.to(work), A, B.to(work), C.to(work), D, z=z.to(work),
            delta_bias=dt_bias, delta_softplus=True, backend=backend)


def grouped_ssm(branches: Sequence["SSMBranch"], x: torch.Tensor, z: torch.Tensor,
                fp32_out: bool = True) -> torch.Tensor:
    """K :class:`SSMBranch` es of one configuration, each with its own weights, at once.

    x, z: (batch, K * d_inner, L), branch k on channels [k d_inner, (k+1) d_inner).
    Returns (batch, K * d_inner, L): ``cat([branch_k.ssm(x_k, z_k)], 1)`` up to float
    rounding, computed as one depthwise convolution, two batched matmuls and ONE grouped
    selective scan (B/C of shape (batch, K, N, L)).
    """
    if len(branches) == 1:
        return branches[0].ssm(x, z, fp32_out)
    K, first = len(branches), branches[0]
    d, L, b = first.d_inner, x.shape[-1], x.shape[0]
    conv_w = torch.cat([br.conv1d.weight for br in branches])  # (K d, 1, d_conv)
    conv_b = None if first.conv1d.bias is None else torch.cat([br.conv1d.bias for br in branches])
    if x.is_cuda and _CAUSAL_CONV1D is not None:
        x = _CAUSAL_CONV1D(x.contiguous(), conv_w.squeeze(1), conv_b, activation="silu")
    else:
        x = F.silu(F.conv1d(x, conv_w, conv_b, padding=first.d_conv - 1, groups=K * d)[..., :L])
    w_x = torch.stack([br.x_proj.weight for br in branches])  # (K, R + 2N, d)
    x_dbl = torch.matmul(w_x, x.view(b, K, d, L))  # (b, K, R + 2N, L)
    dt, B, C = torch.split(x_dbl, [first.dt_rank, first.d_state, first.d_state], dim=2)
    dt = torch.matmul(torch.stack([br.dt_proj.weight for br in branches]), dt)  # (b, K, d, L)
    cat = lambda name: torch.cat([getattr(br, name) for br in branches])  # noqa: E731
    return _scan(x, dt.reshape(b, K * d, L), cat("A_log"), B, C, cat("D"), z,
                 torch.cat([br.dt_proj.bias for br in branches]), first.scan_backend, fp32_out)


def _dt_rank(d_model: int, dt_rank) -> int:
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


class Mamba(SSMBranch):
    """Mamba block (Gu & Dao 2023, Sec. 3.4), a drop-in for ``mamba_ssm.Mamba``.

    Input (batch, L, d_model) -> output (batch, L, d_model). ``d_inner = expand * d_model``;
    ``dt_rank='auto'`` is ceil(d_model / 16). Same parameter names and shapes as
    ``mamba_ssm.Mamba`` (its branch parameters sit at top level, as there).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False,
                 scan_backend: Optional[str] = None):
        d_inner = int(expand * d_model)
        super().__init__(d_inner, d_state, d_conv, _dt_rank(d_model, dt_rank), dt_min, dt_max,
                         dt_init, dt_scale, dt_init_floor, conv_bias, scan_backend)
        self.d_model, self.expand = d_model, expand
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        y = self.ssm(x, z, fp32_out=False)  # (b, d_inner, L) in the projections' dtype
        return self.out_proj(y.transpose(1, 2))


def grouped_mamba(mambas: Sequence[Mamba], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """K :class:`Mamba` blocks of one configuration, each with its own weights and its own
    input (batch, L, d_model), run as batched matmuls and ONE grouped selective scan.

    Returns the K outputs (batch, L, d_model): ``[m(x) for m, x in zip(mambas, inputs)]``
    up to float rounding (Taming Mambas' bi- and multi-directional layers).
    """
    if len(mambas) == 1:
        return [mambas[0](inputs[0])]
    K, first = len(mambas), mambas[0]
    d = first.d_inner
    xt = torch.stack(inputs, 1).transpose(2, 3)  # (b, K, d_model, L)
    w_in = torch.stack([m.in_proj.weight for m in mambas])  # (K, 2 d, d_model)
    x = torch.matmul(w_in[:, :d], xt)  # (b, K, d, L)
    z = torch.matmul(w_in[:, d:], xt)
    if first.in_proj.bias is not None:
        b_in = torch.stack([m.in_proj.bias for m in mambas])[..., None]  # (K, 2 d, 1)
        x, z = x + b_in[:, :d], z + b_in[:, d:]
    b, L = x.shape[0], x.shape[-1]
    y = grouped_ssm(mambas, x.reshape(b, K * d, L), z.reshape(b, K * d, L), fp32_out=False)
    w_out = torch.stack([m.out_proj.weight for m in mambas])  # (K, d_model, d)
    out = torch.matmul(w_out, y.view(b, K, d, L)).transpose(2, 3)  # (b, K, L, d_model)
    if first.out_proj.bias is not None:
        out = out + torch.stack([m.out_proj.bias for m in mambas])[:, None]
    return list(out.unbind(1))


class MultiScanMamba(nn.Module):
    """Mamba with shared in/out projections and one :class:`SSMBranch` per sequence order.

    The caller passes the sequences in the branches' orders as ``permutations``: index
    tensors of length L (``None`` for the identity); branch i reads ``x[..., perm_i]`` and
    its output is put back in the original order before the branch outputs are summed.
    This is SegMamba's Tri-orientated Mamba (Xing et al. 2024, Sec. 2.2, Eq. 2) with three
    branches (forward, reversed, inter-slice). Input/output (batch, L, d_model).
    """

    def __init__(self, d_model: int, num_branches: int, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank="auto", bias: bool = False,
                 scan_backend: Optional[str] = None):
        super().__init__()
        self.d_inner = int(expand * d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.branches = nn.ModuleList(
            SSMBranch(self.d_inner, d_state, d_conv, _dt_rank(d_model, dt_rank),
                      scan_backend=scan_backend) for _ in range(num_branches))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor,
                permutations: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        if len(permutations) != len(self.branches):
            raise ValueError(f"{len(self.branches)} branches but {len(permutations)} orders")
        xz = self.in_proj(hidden_states).transpose(1, 2)
        xs, zs = [], []
        for perm in permutations:
            x, z = (xz if perm is None else xz[..., perm]).chunk(2, dim=1)
            xs.append(x)
            zs.append(z)
        # the branches side by side along the channels: one grouped scan (float32 out,
        # so that the branch outputs are summed in float32 as before)
        ys = grouped_ssm(self.branches, torch.cat(xs, 1), torch.cat(zs, 1)).chunk(len(xs), 1)
        out = 0
        for y, perm in zip(ys, permutations):
            if perm is not None:
                y = torch.empty_like(y).index_copy_(-1, perm, y)
            out = out + y
        return self.out_proj(out.transpose(1, 2).to(self.out_proj.weight.dtype))
