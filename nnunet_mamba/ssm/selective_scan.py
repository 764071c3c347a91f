"""The selective scan of Mamba (Gu & Dao 2023, Algorithm 2) behind one function.

``selective_scan`` has the signature and semantics of
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``::

    delta = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h_0 = 0
    y_t   = <C_t, h_t> + D * u_t
    out   = y * silu(z)                              (gate optional)

with u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or grouped
(batch, G, N, L); D, delta_bias: (dim,).  The output has u's dtype.

Backends
--------
``mamba_ssm``
    The fused CUDA kernel of the mamba-ssm package. Used automatically for CUDA
    tensors when ``mamba_ssm`` imports.
``numba``
    Compiled CPU kernel (:mod:`nnunet_mamba.ssm.numba_scan`), used automatically for
    CPU tensors when numba imports: sequential in L, parallel over batch x channel
    tiles on ``torch.get_num_threads()`` threads, one channel per SIMD lane. The
    forward pass keeps the state every T = 64 steps; the backward pass recomputes each
    chunk of T states from its checkpoint, so it never holds the (L, N) states.
    Compiled once per machine (cached on disk; the first call compiles, see the report
    in the numba_scan docstring).
``triton``
    A Triton kernel (:mod:`nnunet_mamba.ssm.triton_scan`) for CUDA tensors, used when
    mamba-ssm does not import and Triton runs on the GPU.
``torch``
    Pure PyTorch, any device. A chunked scan: the sequence is cut into K chunks
    of T ~ sqrt(L) steps; every chunk is scanned from a zero state at once
    (T vectorised steps), the chunk end states are chained (K small steps) and
    the carried state is added back through the within-chunk decay products,
    which are <= 1, so nothing can overflow. The result is the sequential
    recurrence up to float rounding. Channels are processed in blocks so
    that the (batch, block, L, N) work buffers stay under a memory budget,
    and the backward pass recomputes the states instead of storing them
    (custom autograd function), so the autograd graph holds only the inputs.

The numba and torch backends compute in float32 (float64 for float64 inputs) whatever
the input dtype, so bf16/fp16 autocast cannot overflow the state; bias, softplus, D,
the z gate and grouped B/C are computed around the core scan (:mod:`.ops`).

Every backend runs behind one pair of ``torch.library`` custom ops,
``nnunet_mamba::selective_scan_fwd`` / ``selective_scan_bwd`` (:mod:`nnunet_mamba.ssm.ops`),
with fake (meta) implementations and registered autograd, so ``torch.compile`` traces
networks that use the scan without graph breaks.

``backend=None`` picks, for CUDA tensors, the first of :data:`CUDA_PREFERENCE` that runs
(``mamba_ssm``, then ``triton``, then ``torch``); ``numba`` for CPU tensors when numba
imports (else ``torch``); ``torch`` on other devices. The environment variable
``NNUNET_MAMBA_SCAN_BACKEND`` (``torch``, ``numba``, ``mamba_ssm`` or ``triton``; ``auto``
or empty for the default) forces a backend for every call without an explicit
``backend``. Under ``torch.compile`` the choice is made once, when the graph is traced
(no guard on the environment). ``NNUNET_MAMBA_SCAN_MEMORY_MB`` (default 1024) is the
work-buffer budget of the torch backend and of the numba backward's partial sums.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

BACKEND_ENV = "NNUNET_MAMBA_SCAN_BACKEND"
MEMORY_ENV = "NNUNET_MAMBA_SCAN_MEMORY_MB"
BACKENDS = ("torch", "numba", "mamba_ssm", "triton")
#: the default order on CUDA: the first backend that runs is used (the one place of this rule)
CUDA_PREFERENCE = ("mamba_ssm", "triton", "torch")


class ScanBackendError(RuntimeError):
    """A scan backend was requested where it cannot run."""


# ----------------------------------------------------------------------------------------
# backend discovery
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mamba_ssm_scan():
    """(the selective_scan_cuda extension of mamba-ssm, None) when it imports, else (None, why)."""
    try:
        import selective_scan_cuda
    except Exception as e:  # ImportError, or an undefined CUDA symbol from a bad build
        return None, f"mamba_ssm does not import ({type(e).__name__}: {e})"
    return selective_scan_cuda, None


@functools.lru_cache(maxsize=None)
def _triton_scan():
    """(the triton_scan module, None) when it imports, else (None, why)."""
    try:
        from . import triton_scan
    except Exception as e:  # triton missing, or the module not written yet
        return None, f"the Triton scan does not import ({type(e).__name__}: {e})"
    return triton_scan, None


@functools.lru_cache(maxsize=None)
def _triton_status(device: torch.device) -> tuple[bool, str]:
    mod, why = _triton_scan()
    if mod is None:
        return False, why
    try:
        ok, why = mod.triton_status(device)
    except Exception as e:
        return False, f"the Triton scan does not run ({type(e).__name__}: {e})"
    return bool(ok), why or "Triton kernel (nnunet_mamba.ssm.triton_scan)"


@functools.lru_cache(maxsize=None)
def _numba_kernels():
    """(the numba_scan module, None) when numba imports, else (None, why)."""
    try:
        from . import numba_scan
    except Exception as e:  # numba missing, incompatible with numpy, or no cache directory
        return None, f"the numba kernels do not load ({type(e).__name__}: {e})"
    return numba_scan, None


def backend_status(device: torch.device | str) -> dict[str, tuple[bool, str]]:
    """For each backend, whether it can run on ``device`` and why (or why not)."""
    device = torch.device(device)
    status = {"torch": (True, "pure PyTorch, runs on every device")}
    if device.type != "cpu":
        status["numba"] = (False, f"the compiled kernel needs CPU tensors, not {device.type}")
    else:
        mod, why = _numba_kernels()
        status["numba"] = (mod is not None, why or "compiled CPU kernel (numba)")
    if device.type != "cuda":
        status["mamba_ssm"] = (False, f"the fused kernel needs CUDA tensors, not {device.type}")
    elif not torch.cuda.is_available():
        status["mamba_ssm"] = (False, "CUDA is not available to torch")
    else:
        fn, why = _mamba_ssm_scan()
        status["mamba_ssm"] = (fn is not None, why or "fused CUDA kernel of mamba-ssm")
    if device.type != "cuda":
        status["triton"] = (False, f"the Triton kernel needs CUDA tensors, not {device.type}")
    elif not torch.cuda.is_available():
        status["triton"] = (False, "CUDA is not available to torch")
    else:
        status["triton"] = _triton_status(device)
    return status


def _default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        status = backend_status(device)
        return next(name for name in CUDA_PREFERENCE if status[name][0])
    if device.type == "cpu" and backend_status(device)["numba"][0]:
        return "numba"
    return "torch"


_INSTALL_HINT = {
    "mamba_ssm": "for the fused kernel install mamba-ssm and causal-conv1d built for your CUDA "
                 "(see the README, 'GPU install')",
    "numba": "the numba kernel runs on CPU tensors only; for it install numba "
             "(pip install numba)",
    "triton": "the Triton kernel runs on CUDA tensors and needs the triton package that "
              "comes with torch's CUDA wheels",
}


def resolve_backend(backend: Optional[str], device: torch.device | str) -> str:
    """The backend that ``selective_scan(..., backend=backend)`` runs on ``device``.

    ``backend`` None means: the environment variable if set, else the best available
    (see the module doc). Asking for a backend that cannot run raises
    :class:`ScanBackendError` with the reason.
    """
    device = torch.device(device)
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "").strip() or "auto"
        source = f"environment variable {BACKEND_ENV}"
    else:
        source = "backend argument"
    if backend == "auto":
        return _default_backend(device)
    if backend not in BACKENDS:
        raise ScanBackendError(
            f"unknown selective-scan backend {backend!r} (from the {source}); "
            f"choose one of {', '.join(BACKENDS)} or 'auto'"
        )
    ok, why = backend_status(device)[backend]
    if not ok:
        raise ScanBackendError(
            f"selective-scan backend {backend!r} (from the {source}) cannot run on "
            f"{device}: {why}. Use backend='torch' or 'auto', or unset {BACKEND_ENV}; "
            f"{_INSTALL_HINT.get(backend, '')}."
        )
    return backend


# ----------------------------------------------------------------------------------------
# chunked linear recurrence (the torch backend's core)
# ----------------------------------------------------------------------------------------
def _chunk_len(L: int) -> int:
    return max(8, int(math.ceil(math.sqrt(L))))


def _to_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """(b, c, L_pad) -> (T, K, b, c): step-major layout, so x[t] is one contiguous step."""
    b, c, Lp = x.shape
    return x.reshape(b, c, Lp // T, T).permute(3, 2, 0, 1).contiguous()


def _from_chunks(x: torch.Tensor) -> torch.Tensor:
    """(T, K, b, c) -> (b, c, K*T)."""
    T, K, b, c = x.shape
    return x.permute(2, 3, 1, 0).reshape(b, c, K * T)


def _linear_scan_(a: torch.Tensor, h: torch.Tensor, reverse: bool = False,
                  consume_a: bool = False) -> torch.Tensor:
    """In place: h_t <- a_t * h_{t-1} + h_t over the flattened (T, K) sequence.

    ``a`` and ``h`` have shape (T, K, ...), step t of chunk k being element k*T + t.
    With ``reverse`` the recurrence runs backwards: h_t <- a_t * h_{t+1} + h_t.
    With ``consume_a`` ``a`` is overwritten (no copy). Returns the state carried past
    the last step (forward: end, reverse: start).
    """
    T, K = a.shape[:2]
    steps = range(T - 2, -1, -1) if reverse else range(1, T)
    # P: decay from the chunk's entry to each step (inclusive), <= 1 in magnitude
    P = a if consume_a else a.clone()
    for t in steps:  # all chunks at once, from a zero state
        prev = t + 1 if reverse else t - 1
        h[t].addcmul_(a[t], h[prev])  # a[t] is read before P[t] (maybe a[t]) is updated
        P[t].mul_(P[prev])
    # chain the chunk states
    last = 0 if reverse else T - 1
    carry = torch.zeros_like(h[0, 0])
    carries = torch.empty_like(h[0])
    chunks = range(K - 1, -1, -1) if reverse else range(K)
    for k in chunks:
        carries[k] = carry
        carry = torch.addcmul(h[last, k], P[last, k], carry)
    h.addcmul_(P, carries.unsqueeze(0))
    return carry


def _shift(h: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """x_{t-1} (x_{t+1} with ``reverse``) in (T, K, ...) layout, zero at the sequence edge."""
    out = torch.empty_like(h)
    if not reverse:
        out[1:] = h[:-1]
        out[0, 1:] = h[-1, :-1]
        out[0, 0] = 0
    else:
        out[:-1] = h[1:]
        out[-1, :-1] = h[0, 1:]
        out[-1, -1] = 0
    return out


def _channel_block(batch: int, L: int, N: int, dim: int, itemsize: int, buffers: int) -> int:
    budget = float(os.environ.get(MEMORY_ENV, "1024")) * 2**20
    per_channel = buffers * batch * L * N * itemsize
    return int(max(1, min(dim, budget // max(per_channel, 1))))


class _TorchCore:
    """Chunked scan y = sum_n C h, h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t in PyTorch.

    u, delta: (b, d, L); A: (d, N); B, C: (b, N, L), all one float dtype. ``forward``
    returns y (b, d, L), the last state (b, d, N) and nothing to save (an empty tensor):
    ``backward`` recomputes the states from the inputs.
    """

    @staticmethod
    def forward(u, delta, A, B, C):
        b, d, L = u.shape
        N = A.shape[1]
        T = _chunk_len(L)
        Lp = -(-L // T) * T
        pad = Lp - L
        if pad:  # delta = 0 -> decay 1 and no input: padded steps leave the state alone
            u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
            B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
        Bc = _to_chunks(B, T).unsqueeze(3)  # (T, K, b, 1, N)
        Cc_t = _to_chunks(C, T).unsqueeze(-1)  # (T, K, b, N, 1)
        y = torch.empty(b, d, Lp, dtype=u.dtype, device=u.device)
        last = torch.empty(b, d, N, dtype=u.dtype, device=u.device)
        step = _channel_block(b, Lp, N, d, u.element_size(), buffers=4)
        for d0 in range(0, d, step):
            sl = slice(d0, min(d, d0 + step))
            a, h = _decay_and_input(u[:, sl], delta[:, sl], A[sl], Bc, T)
            last[:, sl] = _linear_scan_(a, h, consume_a=True)
            del a
            y[:, sl] = _from_chunks(torch.matmul(h, Cc_t).squeeze(-1))  # sum_n h C
            del h
        return (y[..., :L].contiguous() if pad else y), last, u.new_empty(0)

    @staticmethod
    def backward(u, delta, A, B, C, saved, dy, dlast):
        """Gradients (du, ddelta, dA, dB, dC) from dy (b, d, L) and dlast (b, d, N) or None."""
        b, d, L = u.shape
        N = A.shape[1]
        T = _chunk_len(L)
        Lp = -(-L // T) * T
        pad = Lp - L
        if pad:
            u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
            B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
        dy = F.pad(dy.to(u.dtype), (0, pad))
        Bc = _to_chunks(B, T).unsqueeze(3)
        Cc = _to_chunks(C, T).unsqueeze(3)
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dA = torch.empty_like(A)
        dB = torch.zeros_like(Bc.squeeze(3))  # (T, K, b, N)
        dC = torch.zeros_like(dB)
        step = _channel_block(b, Lp, N, d, u.element_size(), buffers=6)
        for d0 in range(0, d, step):
            sl = slice(d0, min(d, d0 + step))
            uc, dc = _to_chunks(u[:, sl], T), _to_chunks(delta[:, sl], T)
            dyc = _to_chunks(dy[:, sl], T).unsqueeze(-1)  # (T, K, b, db, 1)
            a, h = _decay_and_input(u[:, sl], delta[:, sl], A[sl], Bc, T)
            _linear_scan_(a, h)
            # sums over the block's channels as batched matrix products: one read pass
            dC += torch.matmul(dyc.transpose(-1, -2), h).squeeze(-2)  # sum_d dy h
            h_prev = _shift(h)
            del h
            # adjoint: dh_t = C_t dy_t + a_{t+1} dh_{t+1}  (+ dlast at the final step)
            dh = Cc * dyc
            if dlast is not None:
                Kl, tl = divmod(L - 1, T)
                dh[tl, Kl] += dlast[:, sl].to(dh.dtype)
            _linear_scan_(_shift(a, reverse=True), dh, reverse=True, consume_a=True)
            dB += torch.matmul((uc * dc).unsqueeze(-2), dh).squeeze(-2)  # sum_d delta u dh
            s = torch.matmul(dh, Bc.transpose(-1, -2)).squeeze(-1)  # sum_n dh B: (T, K, b, db)
            du[:, sl] = _from_chunks(dc * s)
            w = h_prev.mul_(dh).mul_(a)  # d loss / d(delta_t A), (T, K, b, db, N)
            del a, dh
            dA[sl] = (w * dc.unsqueeze(-1)).sum((0, 1, 2))
            ddelta[:, sl] = _from_chunks(uc * s + w.mul_(A[sl]).sum(-1))
            del w
        dB = _from_chunks(dB)[..., :L]
        dC = _from_chunks(dC)[..., :L]
        return du[..., :L], ddelta[..., :L], dA, dB, dC


def _decay_and_input(u, delta, A, Bc, T):
    """a = exp(delta A) and x = delta u B in (T, K, b, db, N) layout."""
    dc = _to_chunks(delta, T).unsqueeze(-1)
    a = torch.mul(dc, A).exp_()
    x = torch.mul(_to_chunks(delta * u, T).unsqueeze(-1), Bc)
    return a, x


# ----------------------------------------------------------------------------------------
# compiled CPU kernel (the numba backend's core)
# ----------------------------------------------------------------------------------------
#: steps between two stored states of the numba backend: the backward pass recomputes
#: chunks of this length in per-task buffers of (T + 1) x N x TILE that stay in L2 cache
NUMBA_CHUNK = 64


def _np(t: torch.Tensor):
    return t.detach().numpy()


class _NumbaCore:
    """Same contract as :class:`_TorchCore`, computed by the numba kernels on CPU.

    u, delta: (b, d, L); A: (d, N); B, C: (b, N, L), all float32 or all float64.
    ``forward`` returns y (b, d, L), the last state (b, d, N) and the states every
    ``NUMBA_CHUNK`` steps (b, d, K, N), from which ``backward`` recomputes the rest.
    """

    @staticmethod
    def forward(u, delta, A, B, C):
        kernels, _ = _numba_kernels()
        b, d, L = u.shape
        N = A.shape[1]
        T = min(L, NUMBA_CHUNK)
        K = -(-L // T)
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        Bt = B.transpose(1, 2).contiguous()  # (b, L, N): one step's N values together
        Ct = C.transpose(1, 2).contiguous()
        y = u.new_empty(b, d, L)
        last = u.new_empty(b, d, N)
        checkpoints = u.new_empty(b, d, K, N)
        kernels.scan_forward(_np(u), _np(delta), _np(A), _np(Bt), _np(Ct), T, _np(y),
                             _np(last), _np(checkpoints), True, torch.get_num_threads())
        return y, last, checkpoints

    @staticmethod
    def backward(u, delta, A, B, C, checkpoints, dy, dlast):
        """Gradients (du, ddelta, dA, dB, dC) from dy (b, d, L) and dlast (b, d, N) or None."""
        kernels, _ = _numba_kernels()
        b, d, L = u.shape
        N = A.shape[1]
        T = min(L, NUMBA_CHUNK)
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        Bt = B.transpose(1, 2).contiguous()
        Ct = C.transpose(1, 2).contiguous()
        dy = dy.to(u.dtype).contiguous()
        has_dlast = dlast is not None
        dlast = dlast.to(u.dtype).contiguous() if has_dlast else u.new_zeros(1, 1, 1)
        # groups of channel tiles per batch element: enough tasks for every thread, with
        # their partial dB/dC sums (2 x b x G x L x N) under the memory budget
        ntiles = -(-d // kernels.TILE)
        threads = torch.get_num_threads()
        G = min(ntiles, -(-2 * threads // b))
        budget = float(os.environ.get(MEMORY_ENV, "1024")) * 2**20
        G = int(max(1, min(G, budget // (2 * b * L * N * u.element_size()))))
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA = u.new_empty(b, d, N)
        dB = u.new_empty(b, G, L, N)
        dC = u.new_empty(b, G, L, N)
        kernels.scan_backward(_np(u), _np(delta), _np(A), _np(Bt), _np(Ct), _np(dy),
                              _np(dlast), has_dlast, _np(checkpoints.contiguous()), T,
                              _np(du), _np(ddelta), _np(dA), _np(dB), _np(dC), threads)
        return (du, ddelta, dA.sum(0), dB.sum(1).transpose(1, 2),
                dC.sum(1).transpose(1, 2))


# ----------------------------------------------------------------------------------------
# the public function
# ----------------------------------------------------------------------------------------
#: the core scans behind the numba and torch backends (the rest is in :mod:`.ops`)
_CORES = {"torch": _TorchCore, "numba": _NumbaCore}


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim={d}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = (M.dim() == 3 and M.shape == (b, N, L)) or (
            M.dim() == 4 and M.shape[0] == b and M.shape[2:] == (N, L))
        if not ok:
            raise ValueError(
                f"{name} must be (batch={b}, N={N}, L={L}) or (batch, groups, N, L), "
                f"got {tuple(M.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (d,):
            raise ValueError(f"{name} must be (dim={d},), got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


@torch.compiler.assume_constant_result
def _traced_backend(backend: Optional[str], device_type: str, device_index: int) -> str:
    """:func:`resolve_backend` as a constant for ``torch.compile``: evaluated once at tracing."""
    device = torch.device(device_type, device_index if device_index >= 0 else None)
    return resolve_backend(backend, device)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: Optional[str] = None):
    """Selective scan with ``mamba_ssm``'s ``selective_scan_fn`` semantics; see the module doc.

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or (batch, G, N, L);
    D, delta_bias (dim,). Returns out (batch, dim, L) in u's dtype, and with
    ``return_last_state`` also the final state (batch, dim, N) in float32 (float64 for
    float64 inputs with the numba and torch backends). The gradient of the final state
    is used by the numba and torch backends only (mamba_ssm and triton ignore it, as
    mamba-ssm does).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if torch.compiler.is_compiling():
        name = _traced_backend(backend, u.device.type,
                               -1 if u.device.index is None else u.device.index)
    else:
        name = resolve_backend(backend, u.device)
    out, last = _ops.scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), name)
    return (out, last) if return_last_state else out


from . import ops as _ops  # noqa: E402  (registers the custom ops; imports this module)
