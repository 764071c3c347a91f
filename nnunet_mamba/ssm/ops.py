"""The selective scan as ``torch.library`` custom ops, one pair for every backend.

``nnunet_mamba::selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus,
backend) -> (out, last_state, saved, pre_gate)`` and ``nnunet_mamba::selective_scan_bwd``
(gradients of all eight tensor inputs). Both have fake (meta) implementations, and the
forward op has its autograd registered (:func:`torch.library.register_autograd`), so
``torch.compile`` traces a network that uses the scan into one graph: the op is opaque to
the compiler and runs the backend's own kernels. ``backend`` is one of
:data:`~nnunet_mamba.ssm.selective_scan.BACKENDS`, already resolved by
:func:`~nnunet_mamba.ssm.selective_scan.selective_scan`:

* ``mamba_ssm``: mamba-ssm's ``selective_scan_cuda.fwd/bwd`` called directly (the fused
  kernel does bias, softplus, D and the gate); ``saved`` is its chunk states
  (b, d, ceil(L/2048), 2N), ``pre_gate`` its output before the z gate;
* ``triton``: :mod:`nnunet_mamba.ssm.triton_scan` (recomputes everything backwards);
* ``numba`` / ``torch``: the core scans of :mod:`.selective_scan` with bias, softplus,
  grouped B/C, D and the gate computed around them in float32 (float64 for float64
  inputs); ``saved`` is the numba kernel's state checkpoints (torch: nothing).

Tensors a backend does not need are empty (0 elements). Absent optional gradients of the
backward op are empty too and become None in the autograd formula.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import selective_scan as _ss


def autocast_off(device: torch.device):
    """Autocast disabled on ``device`` (the scan keeps its state in float32); a no-op context
    on devices without autocast. The one helper for every module of ours that needs it."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _work_dtype(u: Tensor, delta: Tensor, A: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype) else torch.float32


def _groups(B: Tensor, C: Tensor, dim: int):
    """None for shared B/C, else [(channel slice, B_g, C_g)] for grouped (b, G, N, L) B/C."""
    if B.dim() == 3 and C.dim() == 3:
        return None
    G = (B if B.dim() == 4 else C).shape[1]
    if dim % G:
        raise ValueError(f"dim {dim} is not divisible by the {G} groups of B/C")
    per = dim // G
    return [(slice(g * per, (g + 1) * per), B[:, g] if B.dim() == 4 else B,
             C[:, g] if C.dim() == 4 else C) for g in range(G)]


def _numba_chunks(L):
    T = min(L, _ss.NUMBA_CHUNK)
    return -(-L // T)


# ----------------------------------------------------------------------------------------
# numba / torch: the core scan and what goes around it
# ----------------------------------------------------------------------------------------
def _core_fwd(core, u, delta, A, B, C, D, z, delta_bias, softplus):
    work = _work_dtype(u, delta, A)
    with autocast_off(u.device):
        u_, delta_ = u.to(work), delta.to(work)
        if delta_bias is not None:
            delta_ = delta_ + delta_bias.to(work)[:, None]
        if softplus:
            delta_ = F.softplus(delta_)
        A_, B_, C_ = A.to(work), B.to(work), C.to(work)
        groups = _groups(B_, C_, u.shape[1])
        if groups is None:
            y, last, saved = core.forward(u_, delta_, A_, B_, C_)
        else:
            parts = [core.forward(u_[:, sl], delta_[:, sl], A_[sl], Bg, Cg)
                     for sl, Bg, Cg in groups]
            y = torch.cat([p[0] for p in parts], 1)
            last = torch.cat([p[1] for p in parts], 1)
            saved = torch.cat([p[2] for p in parts], 1) if parts[0][2].dim() > 1 else parts[0][2]
        if D is not None:
            y = torch.addcmul(y, u_, D.to(work)[:, None])  # no (b, d, L) temporary for u D
        pre = y if z is not None else u_.new_empty(0)
        if z is not None:
            y = y * F.silu(z.to(work))
    return y.to(u.dtype), last, saved, pre


def _core_bwd(core, dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, saved, pre):
    work = _work_dtype(u, delta, A)
    with autocast_off(u.device):
        u_, dp = u.to(work), delta.to(work)
        if delta_bias is not None:
            dp = dp + delta_bias.to(work)[:, None]
        delta_ = F.softplus(dp) if softplus else dp
        A_, B_, C_ = A.to(work), B.to(work), C.to(work)
        dy = dout.to(work)
        dz = None
        if z is not None:
            z_ = z.to(work)
            dz = torch.ops.aten.silu_backward(dy * pre, z_)
            dy = dy * F.silu(z_)
            del z_
        dD = torch.einsum("bdl,bdl->d", dy, u_) if D is not None else None
        groups = _groups(B_, C_, u.shape[1])
        if groups is None:
            du, ddelta, dA, dB, dC = core.backward(u_, delta_, A_, B_, C_, saved, dy, dlast)
        else:
            parts = [core.backward(u_[:, sl], delta_[:, sl], A_[sl], Bg, Cg,
                                   saved[:, sl] if saved.dim() > 1 else saved, dy[:, sl],
                                   None if dlast is None else dlast[:, sl])
                     for sl, Bg, Cg in groups]
            du, ddelta = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
            dA = torch.cat([p[2] for p in parts], 0)
            dB, dC = torch.stack([p[3] for p in parts], 1), torch.stack([p[4] for p in parts], 1)
            dB = dB if B.dim() == 4 else dB.sum(1)
            dC = dC if C.dim() == 4 else dC.sum(1)
        del delta_
        if D is not None:
            du = du.addcmul_(dy, D.to(work)[:, None])  # du is the core's fresh tensor
        del dy
        if softplus:
            ddelta = torch.ops.aten.softplus_backward(ddelta, dp, 1.0, 20.0)
        ddb = ddelta.sum((0, 2)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, ddb


# ----------------------------------------------------------------------------------------
# mamba_ssm: the fused CUDA kernel, called directly
# ----------------------------------------------------------------------------------------
def _as_groups(M: Tensor) -> Tensor:
    return (M if M.dim() == 4 else M.unsqueeze(1)).contiguous()


def _mamba_fwd(u, delta, A, B, C, D, z, delta_bias, softplus):
    ext, _ = _ss._mamba_ssm_scan()
    z = None if z is None else z.contiguous()
    out, x, *rest = ext.fwd(u.contiguous(), delta.contiguous(), A.contiguous(), _as_groups(B),
                            _as_groups(C), D, z, delta_bias, softplus)
    last = x[:, :, -1, 1::2].contiguous()  # (b, d, N)
    if z is None:
        return out, last, x, delta.new_empty(0)
    return rest[0], last, x, out


def _mamba_bwd(dout, u, delta, A, B, C, D, z, delta_bias, softplus, x, pre):
    ext, _ = _ss._mamba_ssm_scan()
    z = None if z is None else z.contiguous()
    du, ddelta, dA, dB, dC, dD, ddb, *rest = ext.bwd(
        u.contiguous(), delta.contiguous(), A.contiguous(), _as_groups(B), _as_groups(C), D, z,
        delta_bias, dout.contiguous(), x, pre if z is not None else None, None, softplus, False)
    dB = dB if B.dim() == 4 else dB.squeeze(1)
    dC = dC if C.dim() == 4 else dC.squeeze(1)
    return du, ddelta, dA, dB, dC, dD, rest[0] if z is not None else None, ddb


# ----------------------------------------------------------------------------------------
# the custom ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("nnunet_mamba::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool, backend: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, last_state, saved, pre_gate); see the module doc."""
    if backend == "mamba_ssm":
        return _mamba_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "triton":
        mod, _ = _ss._triton_scan()
        out, last = mod.selective_scan_forward(u, delta, A, B, C, D, z, delta_bias,
                                               delta_softplus)
        return (out.to(u.dtype).contiguous(), last.float().contiguous(), u.new_empty(0),
                u.new_empty(0))
    out, last, saved, pre = _core_fwd(_ss._CORES[backend], u, delta, A, B, C, D, z, delta_bias,
                                      delta_softplus)
    return out.contiguous(), last.contiguous(), saved.contiguous(), pre.contiguous()


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    b, d, L = u.shape
    N = A.shape[1]
    if backend == "mamba_ssm":  # out like delta (out_z like z), states in A's dtype
        x = u.new_empty((b, d, -(-L // 2048), 2 * N), dtype=A.dtype)
        pre = u.new_empty((b, d, L) if z is not None else (0,), dtype=delta.dtype)
        out_dtype = z.dtype if z is not None else delta.dtype
        return (u.new_empty((b, d, L), dtype=out_dtype), u.new_empty((b, d, N), dtype=A.dtype),
                x, pre)
    if backend == "triton":
        return (u.new_empty((b, d, L)), u.new_empty((b, d, N), dtype=torch.float32),
                u.new_empty(0), u.new_empty(0))
    work = _work_dtype(u, delta, A)
    saved = (u.new_empty((b, d, _numba_chunks(L), N), dtype=work) if backend == "numba"
             else u.new_empty(0, dtype=work))
    pre = u.new_empty((b, d, L) if z is not None else (0,), dtype=work)
    return u.new_empty((b, d, L)), u.new_empty((b, d, N), dtype=work), saved, pre


@torch.library.custom_op("nnunet_mamba::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor,
                       A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                       backend: str, saved: Tensor, pre: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype; the
    gradients of absent inputs are empty tensors."""
    if backend == "mamba_ssm":
        grads = _mamba_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, saved, pre)
    elif backend == "triton":
        mod, _ = _ss._triton_scan()
        grads = mod.selective_scan_backward(dout, u, delta, A, B, C, D, z, delta_bias,
                                            delta_softplus)
    else:
        grads = _core_bwd(_ss._CORES[backend], dout, dlast, u, delta, A, B, C, D, z, delta_bias,
                          delta_softplus, saved, pre)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(u.new_empty(0) if x is None or g is None else g.to(x.dtype).contiguous()
                 for g, x in zip(grads, inputs))


@selective_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, saved, pre):
    return tuple(u.new_empty(0) if x is None else torch.empty_like(x, memory_format=torch.contiguous_format)
                 for x in (u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    _, _, saved, pre = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, saved, pre)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend
    # outputs that get no gradient (saved, pre_gate, usually last_state) reach the backward as
    # None, not as zero tensors of their shapes (pre_gate: one more (b, d, L) tensor per call)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast, _dsaved, _dpre):
    u, delta, A, B, C, D, z, delta_bias, saved, pre = ctx.saved_tensors
    if dout is None:
        dout = u.new_zeros(u.shape, dtype=(z if z is not None else u).dtype)
    dout = dout.contiguous()  # dense outside the op, as the inputs in scan()
    if ctx.backend in ("mamba_ssm", "triton"):
        dlast = None  # these kernels do not take it (as in mamba-ssm)
    du, ddelta, dA, dB, dC, dD, dz, ddb = torch.ops.nnunet_mamba.selective_scan_bwd(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.backend,
        saved, pre)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None,
            dz if z is not None else None, ddb if delta_bias is not None else None, None, None)


torch.library.register_autograd("nnunet_mamba::selective_scan_fwd", _backward,
                                setup_context=_setup_context)


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, backend: str):
    """(out, last_state) of the scan on a resolved ``backend``, through the custom op."""
    if backend in ("mamba_ssm", "triton"):  # their kernels take float32 weights
        A = A.float()
        D = None if D is None else D.float()
        delta_bias = None if delta_bias is None else delta_bias.float()
    # Every backend reads dense inputs. Made dense here, outside the op, torch.compile fuses
    # each copy into the kernel that produces the tensor (e.g. a transpose with its dtype
    # cast) instead of running one more copy kernel inside the op; eager copies the same.
    u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
    z = None if z is None else z.contiguous()
    out, last, _, _ = torch.ops.nnunet_mamba.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend)
    return out, last
