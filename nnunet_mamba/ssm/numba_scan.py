"""Compiled CPU kernels of the selective scan (the ``numba`` backend's core).

The recurrence of Gu & Dao 2023 (Algorithm 2), with the decay and input already formed
by the caller (``delta`` after bias and softplus)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        h_{-1} = 0
    y_t = <C_t, h_t>

runs sequentially in L and in parallel over batch x channel tiles (tasks spread over
``threads`` Python threads; the compiled kernels release the GIL). A tile is ``TILE``
channels that one task scans together, one channel per SIMD lane: the innermost loop is
over the tile's channels, of constant length, so the compiler vectorises it (exp
included, see :func:`vexp`) without reordering any sum. Layouts: u, delta, y: (b, d, L);
A: (d, N); Bt, Ct: (b, L, N) (time-major: the N values of one step together).

The forward pass stores the state at the start of every chunk of T steps
(``checkpoints``: (b, d, K, N), K = ceil(L / T)) when a backward pass follows. The
backward pass walks the chunks from the last to the first: it recomputes the chunk's
states and decays from its checkpoint into (T + 1, N, TILE) buffers, then runs the
adjoint recurrence ``dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}`` backwards through
the chunk. It never holds all (L, N) states: its memory is the checkpoints, small
per-task buffers and per-task partial sums of dB and dC ((b, L, N) each).

Compiled on first use for float32 and float64; ``cache=True`` stores the machine code
in ``__pycache__`` beside this file (or numba's user cache directory when that is not
writable), so later processes load it instead of compiling.
"""
from __future__ import annotations

import threading

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

#: channels scanned together by one task, one per SIMD lane
TILE = 16


# ----------------------------------------------------------------------------------------
# exp that vectorises: Cody-Waite range reduction + Taylor polynomial + exponent bits
# ----------------------------------------------------------------------------------------
@intrinsic
def _bits_as_float(typingctx, bits):
    """Reinterpret int32 bits as float32, int64 bits as float64."""
    if bits == types.int32:
        sig, lltype = types.float32(bits), ir.FloatType()
    elif bits == types.int64:
        sig, lltype = types.float64(bits), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], lltype)

    return sig, codegen


_F32 = np.float32
_LOG2E_32, _LN2_HI_32, _LN2_LO_32 = _F32(1.44269504088896341), _F32(0.693359375), _F32(-2.12194440e-4)
_LO_32, _HI_32, _HALF_32, _ONE_32 = _F32(-87.9), _F32(88.72), _F32(0.5), _F32(1.0)
# 1/i! for i = 7..1: |r| <= ln2/2 leaves a truncation error below 1e-8 (float32 eps 1.2e-7)
_P32 = tuple(_F32(1.0 / f) for f in (5040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0))

_LOG2E_64, _LN2_HI_64, _LN2_LO_64 = 1.4426950408889634, 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LO_64, _HI_64 = -708.9, 709.78
# 1/i! for i = 13..1: truncation error below 5e-18 (float64 eps 2.2e-16)
_P64 = (1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
        1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
        1.0 / 6.0, 0.5, 1.0)


def vexp(x):
    """exp(x) for float32/float64 in nopython code, within a few ulp of libm's.

    Results below the smallest normal number (x < -87.9 in float32, -708.9 in float64)
    are flushed to 0, NaN stays NaN. Unlike a call to libm it inlines and vectorises.
    """
    raise NotImplementedError("vexp is for numba-compiled code")


@overload(vexp)
def _vexp_overload(x):
    if x == types.float32:
        def exp32(x):
            if x < _LO_32:  # NaN passes both tests and comes out NaN
                x = _LO_32
            if x > _HI_32:
                x = _HI_32
            k = np.floor(x * _LOG2E_32 + _HALF_32)
            r = (x - k * _LN2_HI_32) - k * _LN2_LO_32
            p = _P32[0]
            p = p * r + _P32[1]
            p = p * r + _P32[2]
            p = p * r + _P32[3]
            p = p * r + _P32[4]
            p = p * r + _P32[5]
            p = p * r + _P32[6]
            p = p * r + _ONE_32
            return p * _bits_as_float(np.int32((np.int64(k) + 127) << 23))
        return exp32
    if x == types.float64:
        def exp64(x):
            if x < _LO_64:
                x = _LO_64
            if x > _HI_64:
                x = _HI_64
            k = np.floor(x * _LOG2E_64 + 0.5)
            r = (x - k * _LN2_HI_64) - k * _LN2_LO_64
            p = _P64[0]
            p = p * r + _P64[1]
            p = p * r + _P64[2]
            p = p * r + _P64[3]
            p = p * r + _P64[4]
            p = p * r + _P64[5]
            p = p * r + _P64[6]
            p = p * r + _P64[7]
            p = p * r + _P64[8]
            p = p * r + _P64[9]
            p = p * r + _P64[10]
            p = p * r + _P64[11]
            p = p * r + _P64[12]
            p = p * r + 1.0
            return p * _bits_as_float(np.int64((np.int64(k) + 1023) << 52))
        return exp64
    return None


@nb.njit(cache=True)
def exp_array(x, out):
    """out = vexp(x) elementwise on 1-D arrays (for tests of :func:`vexp`)."""
    for i in range(x.shape[0]):
        out[i] = vexp(x[i])


# ----------------------------------------------------------------------------------------
# the scan
# ----------------------------------------------------------------------------------------
def scan_forward(u, delta, A, Bt, Ct, T, y, last, checkpoints, save_checkpoints, threads):
    """Fill y (b, d, L), last (b, d, N) and, with ``save_checkpoints``, checkpoints.

    Tasks: (batch element, channel tile) pairs, spread over ``threads`` threads.
    """
    ntasks = u.shape[0] * ((u.shape[1] + TILE - 1) // TILE)
    _run_parallel(_forward_tasks, ntasks, threads,
                  (u, delta, A, Bt, Ct, T, y, last, checkpoints, save_checkpoints))


def scan_backward(u, delta, A, Bt, Ct, dy, dlast, has_dlast, checkpoints, T,
                  du, ddelta, dA, dB_part, dC_part, threads):
    """Gradients of sum(dy * y) + sum(dlast * last) w.r.t. u, delta, A, B and C.

    Writes du, ddelta (b, d, L); dA (b, d, N) (its sum over the batch is dA); dB_part and
    dC_part (b, G, L, N) (their sums over G are dB, dC in (b, L, N) layout). Task
    (batch bi, group g) scans the channel tiles g, g + G, ... of batch element bi, all
    tiles chunk by chunk from the end, so its dB/dC rows are complete after each chunk.
    """
    ntasks = u.shape[0] * dB_part.shape[1]
    _run_parallel(_backward_tasks, ntasks, threads,
                  (u, delta, A, Bt, Ct, dy, dlast, has_dlast, checkpoints, T, du, ddelta, dA,
                   dB_part, dC_part))


def _run_parallel(kernel, ntasks: int, threads: int, args: tuple) -> None:
    """kernel(first, step, *args) on min(threads, ntasks) threads: worker w runs the
    tasks w, w + workers, ... The kernels release the GIL, so the threads run at once.

    (Python threads rather than ``prange``: numba's parallel lowering re-optimises the
    whole kernel inside its gufunc and quadruples the one-off compile time.)
    """
    workers = max(1, min(int(threads), ntasks))
    if workers == 1:
        kernel(0, 1, *args)
        return
    errors = []

    def work(w):
        try:
            kernel(w, workers, *args)
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    pool = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(1, workers)]
    for t in pool:
        t.start()
    work(0)
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


@nb.njit(cache=True, nogil=True)
def _forward_tasks(first, step, u, delta, A, Bt, Ct, T, y, last, checkpoints,
                   save_checkpoints):
    """Tasks first, first + step, ...: task = (batch element task // ntiles, channel tile
    task % ntiles), scanned from step 0 to L - 1."""
    b, d, L = u.shape
    N = A.shape[1]
    ntiles = (d + TILE - 1) // TILE
    for task in range(first, b * ntiles, step):
        _forward_task(task, u, delta, A, Bt, Ct, T, y, last, checkpoints, save_checkpoints)


@nb.njit(cache=True, nogil=True, inline="always")
def _forward_task(task, u, delta, A, Bt, Ct, T, y, last, checkpoints, save_checkpoints):
    b, d, L = u.shape
    N = A.shape[1]
    ntiles = (d + TILE - 1) // TILE
    K = (L + T - 1) // T
    dtype = u.dtype
    bi = task // ntiles
    c0 = (task % ntiles) * TILE
    nc = min(TILE, d - c0)
    # lanes >= nc stay 0: decay exp(0) = 1, no input, their state stays 0
    At = np.zeros((N, TILE), dtype)
    for lane in range(nc):
        for n in range(N):
            At[n, lane] = A[c0 + lane, n]
    h = np.zeros((N, TILE), dtype)
    dtb = np.zeros((T, TILE), dtype)
    xb = np.zeros((T, TILE), dtype)
    yb = np.empty((T, TILE), dtype)
    acc = np.empty(TILE, dtype)
    for k in range(K):
        t0 = k * T
        Tk = min(L, t0 + T) - t0
        if save_checkpoints:
            for lane in range(nc):
                for n in range(N):
                    checkpoints[bi, c0 + lane, k, n] = h[n, lane]
        for lane in range(nc):
            for j in range(Tk):
                dt = delta[bi, c0 + lane, t0 + j]
                dtb[j, lane] = dt
                xb[j, lane] = dt * u[bi, c0 + lane, t0 + j]
        for j in range(Tk):
            t = t0 + j
            for lane in range(TILE):
                acc[lane] = 0
            for n in range(N):
                bn = Bt[bi, t, n]
                cn = Ct[bi, t, n]
                for lane in range(TILE):
                    hv = vexp(dtb[j, lane] * At[n, lane]) * h[n, lane] + xb[j, lane] * bn
                    h[n, lane] = hv
                    acc[lane] += cn * hv
            for lane in range(TILE):
                yb[j, lane] = acc[lane]
        for lane in range(nc):
            for j in range(Tk):
                y[bi, c0 + lane, t0 + j] = yb[j, lane]
    for lane in range(nc):
        for n in range(N):
            last[bi, c0 + lane, n] = h[n, lane]


@nb.njit(cache=True, nogil=True)
def _backward_tasks(first, step, u, delta, A, Bt, Ct, dy, dlast, has_dlast, checkpoints, T,
                    du, ddelta, dA, dB_part, dC_part):
    """Tasks first, first + step, ...: task = (batch element task // G, tile group
    task % G), scanned from step L - 1 to 0."""
    for task in range(first, u.shape[0] * dB_part.shape[1], step):
        _backward_task(task, u, delta, A, Bt, Ct, dy, dlast, has_dlast, checkpoints, T,
                       du, ddelta, dA, dB_part, dC_part)


@nb.njit(cache=True, nogil=True, inline="always")
def _backward_task(task, u, delta, A, Bt, Ct, dy, dlast, has_dlast, checkpoints, T,
                   du, ddelta, dA, dB_part, dC_part):
    b, d, L = u.shape
    N = A.shape[1]
    K = checkpoints.shape[2]
    G = dB_part.shape[1]
    ntiles = (d + TILE - 1) // TILE
    dtype = u.dtype
    bi = task // G
    g = task % G
    m = (ntiles - g + G - 1) // G  # tiles of this task
    At = np.zeros((m, N, TILE), dtype)
    dh = np.zeros((m, N, TILE), dtype)  # adjoint state, carried across chunks
    dA64 = np.zeros((m, N, TILE), np.float64)
    for i in range(m):
        c0 = (g + i * G) * TILE
        for lane in range(min(TILE, d - c0)):
            for n in range(N):
                At[i, n, lane] = A[c0 + lane, n]
                if has_dlast:
                    dh[i, n, lane] = dlast[bi, c0 + lane, n]
    hbuf = np.zeros((T + 1, N, TILE), dtype)  # hbuf[j]: state before step t0 + j
    abuf = np.empty((T, N, TILE), dtype)  # decay of step t0 + j
    dtb = np.zeros((T, TILE), dtype)
    ub = np.zeros((T, TILE), dtype)
    gyb = np.zeros((T, TILE), dtype)
    dub = np.empty((T, TILE), dtype)
    ddb = np.empty((T, TILE), dtype)
    dBl = np.empty((T, N, TILE), dtype)  # per-lane dB, dC of the chunk
    dCl = np.empty((T, N, TILE), dtype)
    dAc = np.empty((N, TILE), dtype)
    s = np.empty(TILE, dtype)
    wA = np.empty(TILE, dtype)
    for k in range(K - 1, -1, -1):
        t0 = k * T
        Tk = min(L, t0 + T) - t0
        for j in range(Tk):
            for n in range(N):
                for lane in range(TILE):
                    dBl[j, n, lane] = 0
                    dCl[j, n, lane] = 0
        for i in range(m):
            c0 = (g + i * G) * TILE
            nc = min(TILE, d - c0)
            for lane in range(nc):
                for j in range(Tk):
                    dtb[j, lane] = delta[bi, c0 + lane, t0 + j]
                    ub[j, lane] = u[bi, c0 + lane, t0 + j]
                    gyb[j, lane] = dy[bi, c0 + lane, t0 + j]
                for n in range(N):
                    hbuf[0, n, lane] = checkpoints[bi, c0 + lane, k, n]
            for lane in range(nc, TILE):  # a partial tile after a full one
                for j in range(Tk):
                    dtb[j, lane] = 0
                    ub[j, lane] = 0
                    gyb[j, lane] = 0
                for n in range(N):
                    hbuf[0, n, lane] = 0
            # recompute the chunk's decays and states
            for j in range(Tk):
                t = t0 + j
                for n in range(N):
                    bn = Bt[bi, t, n]
                    for lane in range(TILE):
                        a = vexp(dtb[j, lane] * At[i, n, lane])
                        abuf[j, n, lane] = a
                        hbuf[j + 1, n, lane] = (a * hbuf[j, n, lane]
                                                + dtb[j, lane] * ub[j, lane] * bn)
            # adjoint recurrence backwards through the chunk
            for n in range(N):
                for lane in range(TILE):
                    dAc[n, lane] = 0
            for j in range(Tk - 1, -1, -1):
                t = t0 + j
                for lane in range(TILE):
                    s[lane] = 0
                    wA[lane] = 0
                for n in range(N):
                    bn = Bt[bi, t, n]
                    cn = Ct[bi, t, n]
                    for lane in range(TILE):
                        gy = gyb[j, lane]
                        dt = dtb[j, lane]
                        dhn = dh[i, n, lane] + cn * gy
                        dCl[j, n, lane] += gy * hbuf[j + 1, n, lane]
                        dBl[j, n, lane] += dhn * (dt * ub[j, lane])
                        s[lane] += dhn * bn
                        a = abuf[j, n, lane]
                        w = dhn * a * hbuf[j, n, lane]  # d loss / d(delta_t A_n)
                        dAc[n, lane] += w * dt
                        wA[lane] += w * At[i, n, lane]
                        dh[i, n, lane] = a * dhn
                for lane in range(TILE):
                    dub[j, lane] = dtb[j, lane] * s[lane]
                    ddb[j, lane] = ub[j, lane] * s[lane] + wA[lane]
            for lane in range(nc):
                for j in range(Tk):
                    du[bi, c0 + lane, t0 + j] = dub[j, lane]
                    ddelta[bi, c0 + lane, t0 + j] = ddb[j, lane]
            for n in range(N):
                for lane in range(TILE):
                    dA64[i, n, lane] += dAc[n, lane]
        for j in range(Tk):
            for n in range(N):
                sb = dBl[j, n, 0]
                sc = dCl[j, n, 0]
                for lane in range(1, TILE):
                    sb += dBl[j, n, lane]
                    sc += dCl[j, n, lane]
                dB_part[bi, g, t0 + j, n] = sb
                dC_part[bi, g, t0 + j, n] = sc
    for i in range(m):
        c0 = (g + i * G) * TILE
        for lane in range(min(TILE, d - c0)):
            for n in range(N):
                dA[bi, c0 + lane, n] = dA64[i, n, lane]


