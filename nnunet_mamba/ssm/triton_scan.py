"""Selective scan (Gu & Dao 2023, Algorithm 2; mamba-ssm semantics) as Triton kernels.

Same maths as :func:`nnunet_mamba.ssm.selective_scan`::

    delta = softplus(delta + delta_bias)                 (both optional)
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t       h_0 = 0, state kept in float32
    out_t = (<C_t, h_t> + D u_t) * silu(z_t)              (D and the gate optional)

Built for 3D images, i.e. very long sequences (32^3-64^3) and few channels: besides batch
and channel the work is split over *tiles* of T = T2 x 32 steps of the sequence (one
warp; T2 = 8 forward, 4 backward), a chunked scan in three passes:

1. ``_state_kernel``: each tile's end state from a zero start and its decay, as sums
   (no scan): S = sum_t exp(A sum_{r>t} delta_r) delta_t B_t u_t, P = exp(A sum delta).
2. ``_carry_kernel``: chains the tiles, H_k = S_k + P_k H_{k-1}, by associative scans
   over blocks of tiles (b, K, d x N: small).
3. ``_fwd_kernel``: re-scans each tile from H_{k-1}, one state n at a time: every thread
   scans its T2 consecutive steps in registers, the 32 segment totals are scanned across
   the lanes, and y += C_n h_n; then D and the gate.

The backward pass recomputes: passes 1-2 give the forward carries, passes 1-2 in reverse
time the adjoint carries (g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}), and
``_bwd_kernel`` rebuilds h and g of each tile by a forward and a reverse scan per state
and writes du, ddelta, dz; dB and dC are float32 atomic sums over the channels (as in
mamba-ssm; channel c adds into copy c mod R of them, R = 8, the copies summed
afterwards), dA, dD and ddelta_bias per-tile partial sums. Nothing but the inputs is kept
between forward and backward. In the forward grids channels vary fastest (the programs in
flight share B and C tiles in L2); the backward kernel runs groups of 16 tiles, all
channels of a group before the next (B/C and dB/dC of a group stay in L2), tiles fastest
inside a group (channels-first programs collide in their dB/dC atomics: 2.4x slower).
The tile shapes, copies and group size are the fastest of those measured on an H200
(``scripts/tune_triton_scan.py``, bench_results/h200_session3_speed.log). Runs on CUDA, and
on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests). The kernels
are in :mod:`nnunet_mamba.ssm.triton_kernels`; this module launches them.
"""
from __future__ import annotations

import os

import torch

from . import triton_kernels as _k
from .triton_kernels import _IMPORT_ERROR, triton

#: benchmarks only: tile shapes "T2,warps,T2,warps" (forward, backward) instead of the defaults
TILE_ENV = "NNUNET_MAMBA_TRITON_TILES"
#: benchmarks only: tiles per program group of the backward kernel
GROUP_ENV = "NNUNET_MAMBA_TRITON_BWD_GROUP"
#: benchmarks only: copies of dB/dC the backward kernel's channels add into (summed after)
COPIES_ENV = "NNUNET_MAMBA_TRITON_BWD_COPIES"
DEFAULT_BWD_COPIES = 8
DEFAULT_BWD_GROUP = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status(device) -> tuple[bool, str]:
    """(ok, why): whether the Triton scan can run on tensors of ``device``."""
    device = torch.device(device)
    if triton is None:
        return False, f"triton does not import ({_IMPORT_ERROR}); it ships with PyTorch's Linux CUDA wheels"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available to torch"
        major, _ = torch.cuda.get_device_capability(device)
        if major < 7:
            return False, f"Triton needs compute capability >= 7.0, this GPU has {major}.x"
        return True, f"Triton {triton.__version__} kernels (chunked scan)"
    if device.type == "cpu" and _interpreting():
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1), for tests"
    return False, f"the Triton kernels need CUDA tensors, not {device.type}"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tile(L: int, tile=None, backward=False) -> tuple[int, int]:
    """(T2 steps per thread, warps) of a tile of T = T2 x 32 warps steps: one warp (the
    scan across lanes needs no shared memory), 8 steps per thread forward, 4 backward
    (registers; the fastest measured on an H200)."""
    if tile is not None:
        return tile
    env = os.environ.get(TILE_ENV, "").split(",")
    if len(env) == 4:  # for benchmarks: "T2,warps,T2,warps" (forward, backward)
        T2, warps = int(env[2 * backward]), int(env[2 * backward + 1])
        return (T2, warps) if L > 32 * T2 * warps // 2 else (4, 1)
    T2 = 4 if backward else 8
    return (T2, 1) if L > 32 * 4 else (4, 1)


def _prep(u, delta, A, B, C, D, z, delta_bias):
    b, dim, L = u.shape
    N = A.shape[1]
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    if B4.shape[1] != C4.shape[1]:  # one grouped, one not: broadcast the plain one
        G = max(B4.shape[1], C4.shape[1])
        B4, C4 = B4.expand(b, G, N, L), C4.expand(b, G, N, L)
    G = B4.shape[1]
    if dim % G:
        raise ValueError(f"dim {dim} is not divisible by the {G} groups of B/C")
    f32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    return (u.detach().contiguous(), delta.detach().contiguous(), f32(A),
            B4.detach().contiguous(), C4.detach().contiguous(), f32(D),
            None if z is None else z.detach().contiguous(), f32(delta_bias), G, dim // G)


def _chain(S, P, reverse):
    b, K, dim, N = S.shape
    J = dim * N
    KB = min(64, max(2, _next_pow2(K)))
    BJ = 64
    _k._carry_kernel[(triton.cdiv(J, BJ), b)](S, P, K, J, REVERSE=reverse, KB=KB, BJ=BJ,
                                            num_warps=4)


def _forward_states(u, delta, A, B4, delta_bias, delta_softplus, G, dpg, tile):
    """Inclusive tile-end states H (b, K, d, N) float32 (H[:, k] = h after tile k)."""
    b, dim, L = u.shape
    N = A.shape[1]
    T2, warps = tile
    K = triton.cdiv(L, T2 * 32 * warps)
    if K > 65535 or dim > 2**31 - 1 or b > 65535:
        raise ValueError(f"sequence too long for the Triton scan: {K} tiles of {T2 * 32 * warps} "
                         "steps (at most 65535); use backend='torch' or 'mamba_ssm'")
    S = torch.empty(b, K, dim, N, device=u.device, dtype=torch.float32)
    P = torch.empty_like(S)
    bias = delta_bias if delta_bias is not None else A
    _k._state_kernel[(dim, K, b)](u, delta, bias, A, B4, S, P, dim, L, N, K, G, dpg,
                               HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                               T1=32 * warps, T2=T2, num_warps=warps)
    _chain(S, P, reverse=False)
    return S


def selective_scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, *, tile=None):
    """out (b, d, L) in u's dtype and last_state (b, d, N) float32; see the module doc.

    u, delta, z: (b, d, L) float32/float16/bfloat16; A: (d, N) real; B, C: (b, N, L) or
    (b, G, N, L); D, delta_bias: (d,) or None. ``tile`` (steps per thread, warps)
    overrides the tile shape (tests).
    """
    u, delta, A, B4, C4, D, z, delta_bias, G, dpg = _prep(u, delta, A, B, C, D, z, delta_bias)
    b, dim, L = u.shape
    N = A.shape[1]
    T2, warps = tile = _tile(L, tile)
    H = _forward_states(u, delta, A, B4, delta_bias, delta_softplus, G, dpg, tile)
    K = H.shape[1]
    out = torch.empty_like(u)
    dummy = A
    _k._fwd_kernel[(dim, K, b)](
        u, delta, dummy if delta_bias is None else delta_bias, A, B4, C4,
        dummy if D is None else D, u if z is None else z, H, out, dim, L, N, K, G, dpg,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_D=D is not None,
        HAS_Z=z is not None, T1=32 * warps, T2=T2, num_warps=warps)
    return out, H[:, -1].contiguous()


def selective_scan_backward(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                            delta_softplus=False, *, tile=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of sum(out * dout).

    Recomputes the states; None for absent D, z, delta_bias. du, ddelta, dz, dB, dC in
    their inputs' dtypes (dB/dC in B/C's shape), dA, dD, ddelta_bias float32.
    """
    B_shape, C_shape, B_dtype, C_dtype = B.shape, C.shape, B.dtype, C.dtype
    u, delta, A, B4, C4, D, z, delta_bias, G, dpg = _prep(u, delta, A, B, C, D, z, delta_bias)
    b, dim, L = u.shape
    N = A.shape[1]
    dout = dout.detach().contiguous()
    T2, warps = tile = _tile(L, tile, backward=True)
    H = _forward_states(u, delta, A, B4, delta_bias, delta_softplus, G, dpg, tile)
    K = H.shape[1]
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                 HAS_Z=z is not None, T1=32 * warps, T2=T2, num_warps=warps)
    dummy = A
    bias = dummy if delta_bias is None else delta_bias
    zz = u if z is None else z
    Gs = torch.empty_like(H)
    Pg = torch.empty_like(H)
    grid = (dim, K, b)
    _k._bwd_state_kernel[grid](dout, zz, delta, bias, A, C4, Gs, Pg, dim, L, N, K, G, dpg,
                            **flags)
    _chain(Gs, Pg, reverse=True)
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dA = Pg  # per-tile partial sums (b, K, d, N), summed below
    R = max(1, min(int(os.environ.get(COPIES_ENV) or 0) or DEFAULT_BWD_COPIES, dim // G))
    dB = torch.zeros((R, *B4.shape), **f32)
    dC = torch.zeros((R, *C4.shape), **f32)
    part = torch.empty(2, b, K, dim, **f32)  # dD, ddelta_bias partial sums
    dz = torch.empty_like(z) if z is not None else None
    TG = int(os.environ.get(GROUP_ENV) or 0) or DEFAULT_BWD_GROUP
    _k._bwd_kernel[(K * dim, b)](
        u, delta, bias, A, B4, C4, dummy if D is None else D, zz, dout, H, Gs,
        du, ddelta, dA, dB, dC, part[0], du if dz is None else dz, part[1],
        dim, L, N, K, G, dpg, min(TG, K), R, B4.numel(), HAS_D=D is not None, **flags)
    dB, dC = (dB[0], dC[0]) if R == 1 else (dB.sum(0), dC.sum(0))
    dA = dA.sum((0, 1))
    dD = part[0].sum((0, 1)) if D is not None else None
    dbias = part[1].sum((0, 1)) if delta_bias is not None else None

    def back(grad, shape, dtype):
        if len(shape) == 3:
            grad = grad.sum(1) if grad.shape[1] > 1 else grad[:, 0]
        return grad.to(dtype)

    return (du, ddelta, dA, back(dB, B_shape, B_dtype), back(dC, C_shape, C_dtype),
            dD, dz, dbias)
