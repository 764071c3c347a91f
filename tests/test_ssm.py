"""The shared SSM layer on CPU: selective scan backends, Mamba block, scan orders.

- each CPU backend (torch, numba) against a naive sequential scan written here, output and
  gradients of every input, float64 (tight) and float32, with/without z, D, delta_bias,
  softplus, L = 1 and lengths that are no multiple of the chunk, last state, grouped B/C;
- the two backends agree; the numba kernel's exp is within a few ulp of libm's;
- ``Mamba``: state_dict names/shapes of ``mamba_ssm.Mamba``, its initialisation, the same
  output and gradients with both backends, no NaN/Inf under bf16 autocast;
- scan orders: round trip of every order, inter-slice order, ``permutation()``;
- backend choice: defaults, the environment variable, clear errors.
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_mamba.ssm import (AXIS_PERMUTATIONS, INTER_SLICE, NAMED_ORDERS, Mamba, ScanOrder,
                              from_sequence, selective_scan, to_sequence)
from nnunet_mamba.ssm.selective_scan import (BACKEND_ENV, ScanBackendError, backend_status,
                                             resolve_backend)

scan_module = importlib.import_module("nnunet_mamba.ssm.selective_scan")
HAVE_NUMBA = backend_status("cpu")["numba"][0]
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason=backend_status("cpu")["numba"][1])
CPU_BACKENDS = ["torch", pytest.param("numba", marks=needs_numba)]


# ----------------------------------------------------------------------------------------
# reference and inputs
# ----------------------------------------------------------------------------------------
def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False):
    """The recurrence step by step, as written in the paper (Algorithm 2), in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    if B.dim() == 4:  # (b, G, N, L): group g serves channels g*d/G ... (g+1)*d/G - 1
        B = B.repeat_interleave(d // B.shape[1], dim=1)
    else:
        B = B.unsqueeze(1).expand(b, d, *B.shape[1:])
    if C.dim() == 4:
        C = C.repeat_interleave(d // C.shape[1], dim=1)
    else:
        C = C.unsqueeze(1).expand(b, d, *C.shape[1:])
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    # unbind once: indexing inside the loop would make the backward O(L^2)
    for dt_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return (y, h) if return_last_state else y


def make_inputs(b, d, L, N, dtype, groups=0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    bc_shape = (b, groups, N, L) if groups else (b, N, L)
    return dict(
        u=rnd(b, d, L), delta=rnd(b, d, L, scale=0.5),
        A=-torch.rand(d, N, generator=g, dtype=torch.float64).mul(3).add(0.1).to(dtype),
        B=rnd(*bc_shape), C=rnd(*bc_shape), D=rnd(d), z=rnd(b, d, L), delta_bias=rnd(d, scale=0.5),
    )


def run_with_grads(fn, inputs, options, return_last_state):
    """Output (and last state) of fn and the gradients of a fixed loss w.r.t. all inputs."""
    softplus = options.get("softplus", False)
    # without softplus the caller promises delta (+ bias) >= 0, else the state grows
    used = {k: (v.abs() if k in ("delta", "delta_bias") and not softplus else v)
            .clone().requires_grad_() for k, v in inputs.items()
            if k in ("u", "delta", "A", "B", "C") or options.get(k, False)}
    kwargs = dict(delta_softplus=softplus, return_last_state=return_last_state)
    out = fn(**used, **kwargs)
    y, last = out if return_last_state else (out, None)
    loss = (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape))).sum()
    if last is not None:
        loss = loss + (last.to(y.dtype) ** 2).sum()
    grads = torch.autograd.grad(loss, list(used.values()))
    outs = {"y": y.detach()} | ({"last": last.detach()} if last is not None else {})
    return outs | {"d" + k: g for k, g in zip(used, grads)}


def assert_all_close(got, ref, rel, what=""):
    assert got.keys() == ref.keys()
    for k in ref:
        g, r = got[k].double(), ref[k].double()
        assert torch.isfinite(g).all(), (what, k)
        err = ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        assert err < rel, f"{what} {k}: relative error {err:.2e} >= {rel:.0e}"


OPTIONS = {
    "plain": {},
    "all": dict(D=True, z=True, delta_bias=True, softplus=True),
    "z": dict(z=True),
    "D_bias": dict(D=True, delta_bias=True),
    "softplus": dict(softplus=True),
}


# ----------------------------------------------------------------------------------------
# scan against the naive reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("L", [1, 7, 64, 130])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_float64_matches_naive_scan(backend, L, opt):
    # d = 20: one full and one partial tile of the numba kernel; L = 130: no multiple of
    # either backend's chunk length (numba 64, torch ceil(sqrt(L)))
    inputs = make_inputs(2, 20, L, 5, torch.float64)
    last = opt == "all"
    ref = run_with_grads(naive_selective_scan, inputs, OPTIONS[opt], last)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend=backend), inputs,
                         OPTIONS[opt], last)
    assert_all_close(got, ref, 1e-11, f"{backend} L={L} {opt}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("L", [1, 200])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_float32_matches_naive_scan(backend, L, opt):
    inputs = make_inputs(2, 24, L, 16, torch.float32)
    ref = run_with_grads(naive_selective_scan, {k: v.double() for k, v in inputs.items()},
                         OPTIONS[opt], True)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend=backend), inputs,
                         OPTIONS[opt], True)
    assert got["y"].dtype == torch.float32
    assert_all_close(got, ref, 2e-5, f"{backend} float32 L={L} {opt}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("b, d", [(1, 50), (3, 16), (4, 7)])
def test_batch_and_channel_splits(backend, b, d):
    """Task splits of the numba kernel: several tile groups per batch element, odd counts."""
    inputs = make_inputs(b, d, 150, 3, torch.float64, seed=1)
    ref = run_with_grads(naive_selective_scan, inputs, OPTIONS["all"], True)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend=backend), inputs,
                         OPTIONS["all"], True)
    assert_all_close(got, ref, 1e-11, f"{backend} b={b} d={d}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grouped", ["both", "B"])
def test_grouped_B_C(backend, grouped):
    inputs = make_inputs(2, 12, 40, 4, torch.float64, groups=3)
    if grouped == "B":  # C shared by all channels
        inputs["C"] = inputs["C"][:, 0]
    ref = run_with_grads(naive_selective_scan, inputs, OPTIONS["all"], True)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend=backend), inputs,
                         OPTIONS["all"], True)
    assert_all_close(got, ref, 1e-11, f"{backend} grouped {grouped}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_through_last_state_only(backend):
    inputs = {k: v.requires_grad_() for k, v in make_inputs(2, 18, 90, 4, torch.float64).items()
              if k in "u delta A B C".split()}
    _, last = selective_scan(**inputs, return_last_state=True, backend=backend)
    grads = torch.autograd.grad(last.sum(), list(inputs.values()), allow_unused=True,
                                materialize_grads=True)
    _, last_ref = naive_selective_scan(**inputs, return_last_state=True)
    ref = torch.autograd.grad(last_ref.sum(), list(inputs.values()), allow_unused=True,
                              materialize_grads=True)  # C is unused: zero
    for name, g, r in zip(inputs, grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_forward_and_bf16_inputs(backend):
    inputs = make_inputs(2, 16, 100, 8, torch.float32)
    ref = naive_selective_scan(**inputs, delta_softplus=True)
    with torch.no_grad():
        y = selective_scan(**inputs, delta_softplus=True, backend=backend)
        y16 = selective_scan(**{k: v.bfloat16() for k, v in inputs.items()},
                             delta_softplus=True, backend=backend)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    assert ((y16.double() - ref).abs().max() / ref.abs().max()).item() < 0.1


@needs_numba
def test_torch_and_numba_backends_agree():
    inputs = make_inputs(2, 40, 1000, 16, torch.float32, seed=3)
    outs = {be: run_with_grads(lambda **kw: selective_scan(**kw, backend=be), inputs,
                               OPTIONS["all"], True) for be in ("torch", "numba")}
    assert_all_close(outs["numba"], outs["torch"], 1e-4, "numba vs torch")


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_exp_is_within_a_few_ulp(dtype):
    from nnunet_mamba.ssm import numba_scan

    x = np.concatenate([np.linspace(-80, 80, 100001), [0.0, -1e-30, 1e-30]]).astype(dtype)
    out = np.empty_like(x)
    numba_scan.exp_array(x, out)
    ref = np.exp(x.astype(np.float64))
    ulp = np.abs(out - ref) / (ref * np.finfo(dtype).eps)
    assert ulp.max() < 4, ulp.max()
    special = np.array([np.nan, -np.inf, np.inf, -1000.0, 1000.0], dtype)
    numba_scan.exp_array(special, out[:5])
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == np.inf and out[3] == 0
    assert out[4] == np.inf


def test_shape_errors_name_the_tensor():
    inputs = make_inputs(2, 8, 10, 4, torch.float32)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :, :5]}, backend="torch")
    with pytest.raises(ValueError, match="delta_bias must be"):
        selective_scan(**{**inputs, "delta_bias": inputs["D"][:3]}, backend="torch")


# ----------------------------------------------------------------------------------------
# Mamba block
# ----------------------------------------------------------------------------------------
#: mamba_ssm.Mamba(d_model=16, d_state=16, d_conv=4, expand=2): d_inner 32, dt_rank 1
MAMBA_SSM_STATE_DICT = {
    "in_proj.weight": (64, 16),
    "conv1d.weight": (32, 1, 4),
    "conv1d.bias": (32,),
    "x_proj.weight": (1 + 32, 32),
    "dt_proj.weight": (32, 1),
    "dt_proj.bias": (32,),
    "A_log": (32, 16),
    "D": (32,),
    "out_proj.weight": (16, 32),
}


def test_mamba_state_dict_matches_mamba_ssm():
    m = Mamba(d_model=16, d_state=16, d_conv=4, expand=2)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_STATE_DICT


def test_mamba_initialisation():
    torch.manual_seed(0)
    dt_min, dt_max = 0.001, 0.1
    m = Mamba(d_model=64, d_state=16, dt_min=dt_min, dt_max=dt_max)
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    assert dt.log().std() > 0.5  # log-uniform over two decades, not a constant
    expected = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(128, 16)
    torch.testing.assert_close(m.A_log.detach(), expected)
    torch.testing.assert_close(m.D.detach(), torch.ones(128))


@needs_numba
def test_mamba_forward_backward_same_with_torch_and_numba():
    torch.manual_seed(0)
    m = Mamba(d_model=16)
    x = torch.randn(2, 300, 16)
    res = {}
    for backend in ("torch", "numba"):
        m.scan_backend = backend
        m.zero_grad()
        xb = x.clone().requires_grad_()
        y = m(xb)
        y.square().mean().backward()
        res[backend] = [y.detach(), xb.grad] + [p.grad.clone() for p in m.parameters()]
    for a, b in zip(res["numba"], res["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mamba_bf16_autocast_large_inputs_stay_finite(backend):
    torch.manual_seed(0)
    m = Mamba(d_model=16, scan_backend=backend)
    x = (torch.randn(2, 512, 16) * 100).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------------------
# scan orders
# ----------------------------------------------------------------------------------------
ORDERS = list(NAMED_ORDERS.items()) + [(f"axes{o.axes}", o) for o in AXIS_PERMUTATIONS]


@pytest.mark.parametrize("name, order", ORDERS, ids=[n for n, _ in ORDERS])
@pytest.mark.parametrize("shape", [(3, 4, 5), (6, 2, 7)])
def test_scan_order_round_trip(name, order, shape):
    x = torch.randn(2, 3, *shape)
    seq = to_sequence(x, order)
    assert seq.shape == (2, math.prod(shape), 3)
    torch.testing.assert_close(from_sequence(seq, shape, order), x, rtol=0, atol=0)
    if not order.flip_channels:  # permutation(): position i of the sequence is raster p[i]
        raster = x.flatten(2).transpose(1, 2)
        torch.testing.assert_close(seq, raster[:, order.permutation(shape)], rtol=0, atol=0)


@pytest.mark.parametrize("name, order", ORDERS[:4], ids=[n for n, _ in ORDERS[:4]])
@pytest.mark.parametrize("dim", [2, 3])
def test_scan_order_channels_last_maps(name, order, dim):
    from nnunet_mamba.ssm import memory_format_of
    fmt = torch.channels_last_3d if dim == 3 else torch.channels_last
    shape = (3, 4, 5)[-dim:]
    x = torch.randn(2, 3, *shape).contiguous(memory_format=fmt)
    assert memory_format_of(x) == fmt and memory_format_of(x.contiguous()) == torch.contiguous_format
    seq = to_sequence(x, order)
    back = from_sequence(seq, shape, order, memory_format=fmt)
    torch.testing.assert_close(back, x, rtol=0, atol=0)
    assert memory_format_of(back) == fmt
    if order == NAMED_ORDERS["forward"]:  # the raster order of a channels-last map: views both ways
        assert seq.data_ptr() == x.data_ptr() and back.data_ptr() == x.data_ptr()


def test_six_axis_permutations_are_distinct_orders():
    shape = (2, 3, 4)
    perms = {tuple(o.permutation(shape).tolist()) for o in AXIS_PERMUTATIONS}
    assert len(perms) == 6 and len(AXIS_PERMUTATIONS) == 6


def test_inter_slice_order_varies_depth_fastest():
    D, H, W = 5, 3, 4
    x = torch.arange(D * H * W, dtype=torch.float32).reshape(1, 1, D, H, W)
    seq = to_sequence(x, INTER_SLICE)[0, :, 0]
    # first D tokens: voxel (0, 0) of every depth slice, then voxel (0, 1) ...
    torch.testing.assert_close(seq[:D], x[0, 0, :, 0, 0])
    torch.testing.assert_close(seq[D:2 * D], x[0, 0, :, 0, 1])
    assert NAMED_ORDERS["inter_slice"] == INTER_SLICE == ScanOrder(axes=(1, 2, 0))


def test_unknown_order_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scan order 'diagonal'"):
        to_sequence(torch.zeros(1, 1, 2, 2, 2), "diagonal")


# ----------------------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------------------
def test_default_backends(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, "cpu") == ("numba" if HAVE_NUMBA else "torch")
    assert resolve_backend("auto", "cpu") == resolve_backend(None, "cpu")
    if not backend_status("cuda")["mamba_ssm"][0]:
        assert resolve_backend(None, "cuda") == "torch"
    assert resolve_backend(None, "meta") == "torch"


@pytest.mark.parametrize("value", ["torch", "numba", "auto", ""])
def test_environment_variable_forces_the_backend(monkeypatch, value):
    if value == "numba" and not HAVE_NUMBA:
        pytest.skip(backend_status("cpu")["numba"][1])
    monkeypatch.setenv(BACKEND_ENV, value)
    expected = value if value in ("torch", "numba") else ("numba" if HAVE_NUMBA else "torch")
    assert resolve_backend(None, "cpu") == expected
    assert resolve_backend("torch", "cpu") == "torch"  # an explicit argument wins
    # and selective_scan really uses it
    calls = []
    for name, core in list(scan_module._CORES.items()):
        class Spy(core):
            @staticmethod
            def forward(ctx, *args, _core=core, _name=name):
                calls.append(_name)
                return _core.forward(ctx, *args)
        monkeypatch.setitem(scan_module._CORES, name, Spy)
    selective_scan(**make_inputs(1, 4, 5, 2, torch.float32))
    assert calls == [expected]


def test_mamba_ssm_on_cpu_is_a_clear_error(monkeypatch):
    with pytest.raises(ScanBackendError, match="'mamba_ssm'.*cannot run on cpu.*CUDA tensors"):
        resolve_backend("mamba_ssm", "cpu")
    monkeypatch.setenv(BACKEND_ENV, "mamba_ssm")
    with pytest.raises(ScanBackendError, match=f"environment variable {BACKEND_ENV}"):
        selective_scan(**make_inputs(1, 4, 5, 2, torch.float32))
    with pytest.raises(ScanBackendError, match="cannot run on cpu"):
        Mamba(8)(torch.randn(1, 5, 8))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ScanBackendError, match="unknown selective-scan backend 'cuda'.*torch, numba, mamba_ssm"):
        resolve_backend("cuda", "cpu")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(ScanBackendError, match=f"'triton' \\(from the environment variable {BACKEND_ENV}"):
        resolve_backend(None, "cpu")


def test_numba_where_it_cannot_run(monkeypatch):
    with pytest.raises(ScanBackendError, match="'numba'.*cannot run on cuda.*CPU tensors"):
        resolve_backend("numba", "cuda")
    why = "the numba kernels do not load (ModuleNotFoundError: No module named 'numba')"
    monkeypatch.setattr(scan_module, "_numba_kernels", lambda: (None, why))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, "cpu") == "torch"
    assert backend_status("cpu")["numba"] == (False, why)
    with pytest.raises(ScanBackendError, match="No module named 'numba'.*pip install numba"):
        selective_scan(**make_inputs(1, 4, 5, 2, torch.float32), backend="numba")
