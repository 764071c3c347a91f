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
on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as e:  # triton missing (CPU-only wheels, macOS) or broken
    triton = tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

LOG2E = 1.4426950408889634
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


if triton is not None:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        return a1 * a2, b1 * a2 + b2

    @triton.jit
    def _softplus(x):
        e = tl.exp(x)
        w = 1.0 + e
        # log1p(e) accurate for tiny e (Goldberg's trick), x itself above 20 (as torch)
        sp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        return tl.where(x > 20.0, x, sp)

    @triton.jit
    def _load_delta(p, t4, L, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    T2: tl.constexpr):
        """delta after bias and softplus (float32), 0 where not ``mask`` (decay 1, no input),
        and the raw delta + bias."""
        raw = _ld(p, t4, L, T2)
        if HAS_BIAS:
            raw = raw + bias
        dt = raw
        if SOFTPLUS:
            dt = _softplus(raw)
        return tl.where(mask, dt, 0.0), raw

    @triton.jit
    def _ld4(p, t4, L):
        return tl.load(p + t4, mask=t4 < L, other=0.0).to(tl.float32)

    @triton.jit
    def _cat(lo, hi):
        """Rows of lo, then rows of hi; joined so that the rows stay in each thread."""
        x = tl.permute(tl.join(lo, hi), (2, 0, 1))
        return tl.reshape(x, (2 * x.shape[1], x.shape[2]))

    @triton.jit
    def _halves(v):
        return tl.split(tl.permute(tl.reshape(v, (2, v.shape[0] // 2, v.shape[1])), (1, 2, 0)))

    @triton.jit
    def _ld(p, t4, L, T2: tl.constexpr):
        """(T2, T1) float32 tile of p[t], t = t4 + row (t4: (4, T1) times of rows 0-3):
        T2 // 4 vector loads of 4 steps per thread, joined so that every thread holds its
        T2 consecutive steps (a plain (T2, T1) load would spread them over lanes)."""
        if T2 == 4:
            return _ld4(p, t4, L)
        elif T2 == 8:
            return _cat(_ld4(p, t4, L), _ld4(p, t4 + 4, L))
        else:
            return _cat(_cat(_ld4(p, t4, L), _ld4(p, t4 + 4, L)),
                        _cat(_ld4(p, t4 + 8, L), _ld4(p, t4 + 12, L)))

    @triton.jit
    def _st(p, t4, L, v, T2: tl.constexpr):
        """Store a (T2, T1) tile made by :func:`_ld`'s layout (p's dtype)."""
        v = v.to(p.dtype.element_ty)
        if T2 == 4:
            tl.store(p + t4, v, mask=t4 < L)
        elif T2 == 8:
            lo, hi = _halves(v)
            tl.store(p + t4, lo, mask=t4 < L)
            tl.store(p + t4 + 4, hi, mask=t4 + 4 < L)
        else:
            lo, hi = _halves(v)
            _st(p, t4, L, lo, 8)
            _st(p, t4 + 8, L, hi, 8)

    @triton.jit
    def _add(p, t4, L, v, T2: tl.constexpr):
        """Atomic float32 add of a (T2, T1) tile (relaxed: the sums need no ordering)."""
        if T2 == 4:
            tl.atomic_add(p + t4, v, mask=t4 < L, sem="relaxed")
        elif T2 == 8:
            lo, hi = _halves(v)
            tl.atomic_add(p + t4, lo, mask=t4 < L, sem="relaxed")
            tl.atomic_add(p + t4 + 4, hi, mask=t4 + 4 < L, sem="relaxed")
        else:
            lo, hi = _halves(v)
            _add(p, t4, L, lo, 8)
            _add(p, t4 + 8, L, hi, 8)

    @triton.jit
    def _shift(v, t1, T1: tl.constexpr, REVERSE: tl.constexpr, edge_value):
        """v[t1 - 1] (v[t1 + 1] with REVERSE) along the lanes, edge_value at the edge."""
        if REVERSE:
            sh = tl.gather(v, tl.minimum(t1 + 1, T1 - 1), 0)
            return tl.where(t1 == T1 - 1, edge_value, sh)
        else:
            sh = tl.gather(v, tl.maximum(t1 - 1, 0), 0)
            return tl.where(t1 == 0, edge_value, sh)

    @triton.jit
    def _cumsum_tile(v, t1, T1: tl.constexpr, T2: tl.constexpr, REVERSE: tl.constexpr):
        """Inclusive cumulative sum over a (T2, T1) tile in time order t = t1 T2 + t2."""
        cl = tl.cumsum(v, 0, reverse=REVERSE)
        r = tl.arange(0, T2)[:, None]
        seg = tl.sum(tl.where(r == (0 if REVERSE else T2 - 1), cl, 0.0), axis=0)
        cs = tl.cumsum(seg, 0, reverse=REVERSE)
        return cl + _shift(cs, t1, T1, REVERSE, 0.0)[None, :]

    @triton.jit
    def _scan_tile(a, x, h0, t1, T1: tl.constexpr, T2: tl.constexpr, REVERSE: tl.constexpr):
        """h_t = a_t h_{t-1} + x_t (h_{t+1} with REVERSE) over a (T2, T1) tile, time
        t = t1 T2 + t2: T2 steps in each thread, then across the lanes; h0 enters the
        tile. Returns h (T2, T1)."""
        if REVERSE:  # in-thread reverse scans lower to shuffles: flip the rows instead
            al, hl = tl.associative_scan((tl.flip(a, 0), tl.flip(x, 0)), 0, _combine)
            al, hl = tl.flip(al, 0), tl.flip(hl, 0)
        else:
            al, hl = tl.associative_scan((a, x), 0, _combine)
        r = tl.arange(0, T2)[:, None]
        edge = 0 if REVERSE else T2 - 1
        aseg = tl.sum(tl.where(r == edge, al, 0.0), axis=0)
        xseg = tl.sum(tl.where(r == edge, hl, 0.0), axis=0)
        first = (T1 - 1) if REVERSE else 0
        xseg = tl.where(t1 == first, xseg + aseg * h0, xseg)
        _, hend = tl.associative_scan((aseg, xseg), 0, _combine, reverse=REVERSE)
        hstart = _shift(hend, t1, T1, REVERSE, h0)
        return hl + al * hstart[None, :]

    @triton.jit
    def _state_kernel(u_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, S_ptr, P_ptr,
                      dim, L, N, K, G, dpg,
                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                      T1: tl.constexpr, T2: tl.constexpr):
        """Tile k of channel c from a zero state: S = end state, P = exp(A sum delta),
        both (b, K, d, N). S = sum_t exp(A sum_{r>t} delta_r) delta_t u_t B_t (no scan)."""
        # channels vary fastest: the programs in flight share B, C and dB, dC tiles in L2
        c = tl.program_id(0)
        k = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        t1 = tl.arange(0, T1)
        tt = t1[None, :] * T2 + tl.arange(0, T2)[:, None]
        offs_t = k * (T1 * T2) + tt
        t4 = k * (T1 * T2) + t1[None, :] * T2 + tl.arange(0, 4)[:, None]
        mt = offs_t < L
        row = (b * dim + c) * L
        bias = tl.load(bias_ptr + c) if HAS_BIAS else 0.0
        u = _ld(u_ptr + row, t4, L, T2)
        dt, _ = _load_delta(dt_ptr + row, t4, L, mt, bias, HAS_BIAS, SOFTPLUS, T2)
        # sum_{r>t} delta_r inside the tile: reverse cumsum of delta_{t+1}
        dtn, _ = _load_delta(dt_ptr + row + 1, t4, L - 1, (offs_t + 1 < L) & (tt < T1 * T2 - 1),
                             bias, HAS_BIAS, SOFTPLUS, T2)
        rs = _cumsum_tile(dtn, t1, T1, T2, True)
        dtu = dt * u
        total = tl.sum(tl.sum(dt, axis=0), axis=0)
        bc = (b * G + c // dpg) * N * L
        st = ((b * K + k) * dim + c) * N
        for n in range(0, N):
            A2 = tl.load(A_ptr + c * N + n) * 1.4426950408889634
            Bn = _ld(B_ptr + bc + n * L, t4, L, T2)
            S = tl.sum(tl.sum(tl.exp2(A2 * rs) * dtu * Bn, axis=0), axis=0)
            tl.store(S_ptr + st + n, S)
            tl.store(P_ptr + st + n, tl.exp2(A2 * total))

    @triton.jit
    def _carry_kernel(S_ptr, P_ptr, K, J, REVERSE: tl.constexpr, KB: tl.constexpr,
                      BJ: tl.constexpr):
        """In place over (b, K, J): S_k <- S_k + P_k S_{k-1} (S_{k+1} with REVERSE)."""
        pid_j = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_j = pid_j * BJ + tl.arange(0, BJ)
        mj = offs_j < J
        rows = tl.arange(0, KB)
        carry = tl.zeros((BJ,), dtype=tl.float32)
        nblocks = tl.cdiv(K, KB)
        for i in range(0, nblocks):
            blk = nblocks - 1 - i if REVERSE else i
            kk = blk * KB + rows
            m = (kk < K)[:, None] & mj[None, :]
            offs = (b * K + kk)[:, None] * J + offs_j[None, :]
            s = tl.load(S_ptr + offs, mask=m, other=0.0)
            p = tl.load(P_ptr + offs, mask=m, other=1.0)
            edge = (KB - 1) if REVERSE else 0
            s = tl.where(rows[:, None] == edge, s + p * carry[None, :], s)
            _, h = tl.associative_scan((p, s), 0, _combine, reverse=REVERSE)
            tl.store(S_ptr + offs, h, mask=m)
            last = 0 if REVERSE else (KB - 1)
            carry = tl.sum(tl.where(rows[:, None] == last, h, 0.0), axis=0)

    @triton.jit
    def _fwd_kernel(u_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, H_ptr, out_ptr,
                    dim, L, N, K, G, dpg,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                    HAS_Z: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
        """Tile k of channel c re-scanned from its carry H_{k-1}, one state at a time."""
        # channels vary fastest: the programs in flight share B, C and dB, dC tiles in L2
        c = tl.program_id(0)
        k = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        t1 = tl.arange(0, T1)
        offs_t = k * (T1 * T2) + t1[None, :] * T2 + tl.arange(0, T2)[:, None]
        t4 = k * (T1 * T2) + t1[None, :] * T2 + tl.arange(0, 4)[:, None]
        mt = offs_t < L
        io = (b * dim + c) * L
        bias = tl.load(bias_ptr + c) if HAS_BIAS else 0.0
        u = _ld(u_ptr + io, t4, L, T2)
        dt, _ = _load_delta(dt_ptr + io, t4, L, mt, bias, HAS_BIAS, SOFTPLUS, T2)
        dtu = dt * u
        bc = (b * G + c // dpg) * N * L
        st = ((b * K + k - 1) * dim + c) * N
        y = tl.zeros((T2, T1), dtype=tl.float32)
        for n in range(0, N):
            A2 = tl.load(A_ptr + c * N + n) * 1.4426950408889634
            Bn = _ld(B_ptr + bc + n * L, t4, L, T2)
            Cn = _ld(C_ptr + bc + n * L, t4, L, T2)
            h0 = tl.load(H_ptr + st + n, mask=k > 0, other=0.0)
            h = _scan_tile(tl.exp2(A2 * dt), dtu * Bn, h0, t1, T1, T2, False)
            y += Cn * h
        if HAS_D:
            y += tl.load(D_ptr + c) * u
        if HAS_Z:
            z = _ld(z_ptr + io, t4, L, T2)
            y = y * z * tl.sigmoid(z)
        _st(out_ptr + io, t4, L, y, T2)

    @triton.jit
    def _load_dy(dout_ptr, z_ptr, t4, L, HAS_Z: tl.constexpr, T2: tl.constexpr):
        """dout * silu(z) (the gradient reaching y before the gate), z, and dout."""
        dout = _ld(dout_ptr, t4, L, T2)
        if HAS_Z:
            z = _ld(z_ptr, t4, L, T2)
            return dout * z * tl.sigmoid(z), z, dout
        return dout, dout, dout

    @triton.jit
    def _bwd_state_kernel(dout_ptr, z_ptr, dt_ptr, bias_ptr, A_ptr, C_ptr, S_ptr, P_ptr,
                          dim, L, N, K, G, dpg,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                          T1: tl.constexpr, T2: tl.constexpr):
        """Adjoint of tile k from zero beyond it: S = g at the tile's first step s,
        P = exp(A sum_{r=s+1..e} delta_r) (e: the next tile's first step)."""
        # channels vary fastest: the programs in flight share B, C and dB, dC tiles in L2
        c = tl.program_id(0)
        k = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        t1 = tl.arange(0, T1)
        tt = t1[None, :] * T2 + tl.arange(0, T2)[:, None]
        offs_t = k * (T1 * T2) + tt
        t4 = k * (T1 * T2) + t1[None, :] * T2 + tl.arange(0, 4)[:, None]
        mt = offs_t < L
        io = (b * dim + c) * L
        bias = tl.load(bias_ptr + c) if HAS_BIAS else 0.0
        dy, _, _ = _load_dy(dout_ptr + io, z_ptr + io, t4, L, HAS_Z, T2)
        dt, _ = _load_delta(dt_ptr + io, t4, L, mt & (tt > 0), bias, HAS_BIAS, SOFTPLUS, T2)
        cum = _cumsum_tile(dt, t1, T1, T2, False)  # sum_{r=s+1..t} delta_r
        dtn, _ = _load_delta(dt_ptr + io + 1, t4, L - 1, offs_t + 1 < L, bias, HAS_BIAS,
                             SOFTPLUS, T2)
        total = tl.sum(tl.sum(dtn, axis=0), axis=0)
        bc = (b * G + c // dpg) * N * L
        st = ((b * K + k) * dim + c) * N
        for n in range(0, N):
            A2 = tl.load(A_ptr + c * N + n) * 1.4426950408889634
            Cn = _ld(C_ptr + bc + n * L, t4, L, T2)
            S = tl.sum(tl.sum(tl.exp2(A2 * cum) * Cn * dy, axis=0), axis=0)
            tl.store(S_ptr + st + n, S)
            tl.store(P_ptr + st + n, tl.exp2(A2 * total))

    @triton.jit
    def _bwd_kernel(u_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dout_ptr,
                    H_ptr, Gc_ptr,
                    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
                    dim, L, N, K, G, dpg, TG, R, RS,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                    HAS_Z: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
        """Tile k of channel c: per state, h by a forward scan from H_{k-1} and the adjoint
        g by a reverse scan from G_{k+1}; dA/dD/dbias as per-tile partial sums."""
        # program order: groups of TG tiles (all channels of a group before the next
        # group: B/C and dB/dC stay in L2), tiles fastest inside a group (TG = 1: channels
        # fastest, whose dB/dC atomics collide)
        pid = tl.program_id(0)
        first = (pid // (TG * dim)) * TG
        in_group = tl.minimum(TG, K - first)
        r = pid - first * dim
        c = r // in_group
        k = first + r % in_group
        b = tl.program_id(1).to(tl.int64)
        t1 = tl.arange(0, T1)
        offs_t = k * (T1 * T2) + t1[None, :] * T2 + tl.arange(0, T2)[:, None]
        t4 = k * (T1 * T2) + t1[None, :] * T2 + tl.arange(0, 4)[:, None]
        mt = offs_t < L
        io = (b * dim + c) * L
        bias = tl.load(bias_ptr + c) if HAS_BIAS else 0.0
        u = _ld(u_ptr + io, t4, L, T2)
        dt, raw = _load_delta(dt_ptr + io, t4, L, mt, bias, HAS_BIAS, SOFTPLUS, T2)
        dtn, _ = _load_delta(dt_ptr + io + 1, t4, L - 1, offs_t + 1 < L, bias, HAS_BIAS,
                             SOFTPLUS, T2)
        dtu = dt * u
        dy, z, dout = _load_dy(dout_ptr + io, z_ptr + io, t4, L, HAS_Z, T2)
        bc = (b * G + c // dpg) * N * L
        rc = bc + (c % R) * RS  # this channel's copy of dB/dC (R copies: fewer colliding adds)
        st = ((b * K + k) * dim + c) * N
        y = tl.zeros((T2, T1), dtype=tl.float32)
        gB = tl.zeros((T2, T1), dtype=tl.float32)
        wA = tl.zeros((T2, T1), dtype=tl.float32)
        for n in range(0, N):
            A = tl.load(A_ptr + c * N + n)
            A2 = A * 1.4426950408889634
            Bn = _ld(B_ptr + bc + n * L, t4, L, T2)
            Cn = _ld(C_ptr + bc + n * L, t4, L, T2)
            h0 = tl.load(H_ptr + st - dim * N + n, mask=k > 0, other=0.0)
            ge = tl.load(Gc_ptr + st + dim * N + n, mask=k < K - 1, other=0.0)
            x = dtu * Bn
            h = _scan_tile(tl.exp2(A2 * dt), x, h0, t1, T1, T2, False)
            if HAS_Z:
                y += Cn * h
            _add(dC_ptr + rc + n * L, t4, L, dy * h, T2)
            g = _scan_tile(tl.exp2(A2 * dtn), Cn * dy, ge, t1, T1, T2, True)
            _add(dB_ptr + rc + n * L, t4, L, g * dtu, T2)
            gB += g * Bn
            w = g * (h - x)  # g_t exp(delta_t A) h_{t-1}
            wA += A * w
            tl.store(dA_ptr + st + n, tl.sum(tl.sum(w * dt, axis=0), axis=0))
        du = dt * gB
        ddt = u * gB + wA
        sk = (b * K + k) * dim + c
        if HAS_D:
            Dv = tl.load(D_ptr + c)
            du += Dv * dy
            tl.store(dD_ptr + sk, tl.sum(tl.sum(dy * u, axis=0), axis=0))
            if HAS_Z:
                y += Dv * u
        if HAS_Z:
            sz = tl.sigmoid(z)
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))
            _st(dz_ptr + io, t4, L, dz, T2)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(mt, ddt, 0.0)
        if HAS_BIAS:
            tl.store(dbias_ptr + sk, tl.sum(tl.sum(ddt, axis=0), axis=0))
        _st(du_ptr + io, t4, L, du, T2)
        _st(ddt_ptr + io, t4, L, ddt, T2)


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
    _carry_kernel[(triton.cdiv(J, BJ), b)](S, P, K, J, REVERSE=reverse, KB=KB, BJ=BJ,
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
    _state_kernel[(dim, K, b)](u, delta, bias, A, B4, S, P, dim, L, N, K, G, dpg,
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
    _fwd_kernel[(dim, K, b)](
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
    _bwd_state_kernel[grid](dout, zz, delta, bias, A, C4, Gs, Pg, dim, L, N, K, G, dpg,
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
    _bwd_kernel[(K * dim, b)](
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
