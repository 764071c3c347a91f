"""torch.compile of our networks on CPU (issue 10): no graph breaks, no recompiles, same numbers.

- the selective-scan custom ops pass ``torch.library.opcheck`` (torch and numba backends);
- the batched Mamba calls equal the per-view / per-branch computations they replace:
  MICCSS's four siamese views, SegMamba's ToM branches (grouped scan), Taming Mambas'
  bi- and multi-directional layers;
- every network of ours traces into ONE graph (``fullgraph=True``; ``torch._dynamo.explain``
  for nnMambaSeg), its compiled (aot_eager) outputs and gradients equal eager ones, and
  switching between training and validation (eval + no_grad) compiles each mode once only.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from nnunet_mamba.networks.blocks import MICCSS
from nnunet_mamba.networks.mamba_layers import (BidirectionalMambaBlock, FeatureMapMamba,
                                                PreNormMambaBlock)
from nnunet_mamba.networks.nnmamba_cls import nnMambaCls
from nnunet_mamba.networks.nnmamba_landmark import nnMambaLandmark
from nnunet_mamba.networks.nnmamba_seg import nnMambaSeg
from nnunet_mamba.networks.segmamba import SegMamba, TriOrientedMamba
from nnunet_mamba.networks.taming import BiSegMamba, MultiSegMamba, SegMambaSkip, TamingSegMamba
from nnunet_mamba.networks.umamba import UMambaBot, UMambaEnc
from nnunet_mamba.ssm import (AXIS_PERMUTATIONS, BACKEND_ENV, backend_status, from_sequence,
                              to_sequence)
from nnunet_mamba.ssm.mamba import grouped_mamba

from .test_other_segmenters import PATCH_A, configuration, tiny_plans

HAVE_NUMBA = backend_status("cpu")["numba"][0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def close_to_scale(a, b, tol=1e-3, floor=0.0):
    """Equal up to ``tol`` times the largest magnitude, plus ``floor`` (compiled graphs
    decompose BatchNorm and reorder float sums: rounding differences on values near zero)."""
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=tol * scale + floor)


# ---- the custom ops ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    not HAVE_NUMBA, reason="numba does not load"))])
def test_scan_custom_op_passes_opcheck(backend):
    g = torch.Generator().manual_seed(0)
    b, d, L, N = 2, 4, 70, 3

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    A = (-torch.rand(d, N, generator=g, dtype=torch.float64) - 0.1).requires_grad_()
    full = (r(b, d, L), r(b, d, L, scale=0.5), A, r(b, 2, N, L), r(b, N, L), r(d), r(b, d, L),
            r(d), True, backend)  # grouped B, shared C, every option
    bare = (r(b, d, L), r(b, d, L, scale=0.5), A, r(b, N, L), r(b, N, L), None, None, None,
            False, backend)
    for args in (full, bare):
        torch.library.opcheck(torch.ops.nnunet_mamba.selective_scan_fwd.default, args)


def test_scan_backward_makes_no_zero_gradients_for_unused_outputs():
    """The op's extra outputs (saved states, pre-gate output, last state) get no gradient in a
    network; autograd must not fill zero tensors of their shapes for the backward (the
    pre-gate one is as large as the input: +20 % peak memory on the CPU before)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nnunet_mamba.ssm.ops import scan

    class FilledTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(k in str(func) for k in ("zero", "fill")) and isinstance(out, torch.Tensor):
                self.shapes.append(tuple(out.shape))
            return out

    g = torch.Generator().manual_seed(0)
    b, d, L, N = 1, 8, 40, 4
    u, delta, z = (torch.randn(b, d, L, generator=g, requires_grad=True) for _ in range(3))
    B, C = (torch.randn(b, N, L, generator=g, requires_grad=True) for _ in range(2))
    A = (-torch.rand(d, N, generator=g) - 0.1).requires_grad_()
    D, bias = (torch.randn(d, generator=g, requires_grad=True) for _ in range(2))
    for backend in ["torch"] + (["numba"] if HAVE_NUMBA else []):
        out, _ = scan(u, delta, A, B, C, D, z, bias, True, backend)
        filled = FilledTensors()
        with filled:
            out.sum().backward()
        assert filled.shapes == [], (backend, filled.shapes)
        assert u.grad is not None and torch.isfinite(u.grad).all()


# ---- batched Mamba calls equal the computations they replace ----------------------------------
def grads(out, params):
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
               for o in (out if isinstance(out, (list, tuple)) else [out]))
    return torch.autograd.grad(loss, params)


def test_miccss_views_in_one_call_equal_four_calls():
    torch.manual_seed(0)
    m = MICCSS(6).eval()
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    params = [x, *m.parameters()]
    y = m(x)

    def per_view(x):  # the computation before batching: one Mamba call per view
        h = m.proj_in(x)
        mixed = sum(v.from_sequence(m.mamba(v.to_sequence(h)), h.shape[2:]) for v in m.views)
        return m.proj_out(h + mixed / len(m.views))

    ref = per_view(x)
    close(y, ref)
    for a, b in zip(grads(y, params), grads(ref, params)):
        close(a, b)


def test_tom_grouped_scan_equals_branch_by_branch():
    torch.manual_seed(0)
    layer = TriOrientedMamba(6)
    x = torch.randn(2, 6, 4, 3, 5, requires_grad=True)
    params = [x, *layer.parameters()]
    y = layer(x)

    def per_branch(x):  # one SSM branch after the other, as before the grouped scan
        shape = x.shape[2:]
        tokens = layer.norm(to_sequence(x))
        mm = layer.mamba
        xz = mm.in_proj(tokens).transpose(1, 2)
        out = 0
        for branch, order in zip(mm.branches, layer.orders):
            perm = order.permutation(shape)
            xb, zb = xz[..., perm].chunk(2, dim=1)
            yb = branch.ssm(xb, zb)
            out = out + torch.empty_like(yb).index_copy_(-1, perm, yb)
        return x + from_sequence(mm.out_proj(out.transpose(1, 2)), shape)

    ref = per_branch(x)
    close(y, ref)
    for a, b in zip(grads(y, params), grads(ref, params)):
        close(a, b)


def test_grouped_mamba_equals_separate_mambas():
    torch.manual_seed(0)
    blocks = [PreNormMambaBlock(6) for _ in range(3)]
    xs = [torch.randn(2, 20, 6, requires_grad=True) for _ in blocks]
    params = [*xs, *(p for b in blocks for p in b.parameters())]
    got = PreNormMambaBlock.run_many(blocks, xs)
    ref = [b(x) for b, x in zip(blocks, xs)]
    raw = grouped_mamba([b.mamba for b in blocks], xs)
    for a, b, c, x in zip(got, ref, raw, xs):
        close(a, b)
    for blk, c, x in zip(blocks, raw, xs):
        close(c, blk.mamba(x))
    for a, b in zip(grads(got, params), grads(ref, params)):
        close(a, b)


def test_multi_directional_layer_equals_order_by_order():
    torch.manual_seed(0)
    orders = tuple(AXIS_PERMUTATIONS[i] for i in (0, 1, 2, 4))
    layer = FeatureMapMamba(6, [BidirectionalMambaBlock(6, 4) for _ in orders], orders,
                            input_norm=False)
    x = torch.randn(1, 6, 3, 4, 5, requires_grad=True)
    params = [x, *layer.parameters()]
    y = layer(x)

    def order_by_order(x):  # the layer before batching: one direction after the other
        shape = x.shape[2:]
        out = 0
        for blk, order in zip(layer.mixers, orders):
            seq = order.to_sequence(x)
            z = blk.norm(blk.fwd_mamba(seq) + blk.bwd_mamba(seq.flip(1)).flip(1))
            out = out + order.from_sequence(z, shape)
        return out / len(orders)

    ref = order_by_order(x)
    close(y, ref)
    for a, b in zip(grads(y, params), grads(ref, params)):
        close(a, b)


# ---- every network: one graph, same numbers, no recompiles -------------------------------------
def _plans_net(cls):
    def build():
        _, cm = configuration(tiny_plans(PATCH_A))
        return cls.from_plans(cm, 4, 3, deep_supervision=True), (1, 4, *PATCH_A)
    return build


NETWORKS = {
    "nnMambaSeg": lambda: (nnMambaSeg(4, 3, base_channels=4, blocks_per_stage=2,
                                      deep_supervision=True), (2, 4, 16, 16, 16)),
    "SegMamba": lambda: (SegMamba(4, 3, widths=(4, 8, 16, 32), hidden=32), (1, 4, 32, 32, 16)),
    "TamingSegMamba": _plans_net(TamingSegMamba),
    "BiSegMamba": _plans_net(BiSegMamba),
    "MultiSegMamba": _plans_net(MultiSegMamba),
    "SegMambaSkip": _plans_net(SegMambaSkip),
    "UMambaBot": _plans_net(UMambaBot),
    "UMambaEnc": _plans_net(UMambaEnc),
    "nnMambaCls": lambda: (nnMambaCls(4, 3, base_channels=4, blocks_per_stage=1, dropout=0.0),
                           (2, 4, 16, 16, 16)),
    "nnMambaLandmark": lambda: (nnMambaLandmark(1, 2, base_channels=4, blocks_per_stage=1),
                                (2, 1, 16, 16, 16)),
}
#: networks whose train/validation switch is checked for recompiles (one per family)
SWITCH_CHECKED = ("nnMambaSeg", "UMambaBot")
#: networks whose layers the others already run through AOT autograd: Dynamo only (CI time)
DYNAMO_ONLY = ("TamingSegMamba", "SegMambaSkip")


def _loss(out):
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() / o.numel()
               for o in outs)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_compiles_to_one_graph_with_eager_numbers(name):
    torch.manual_seed(0)
    net, shape = NETWORKS[name]()
    x = torch.randn(*shape)
    if name == "nnMambaSeg":
        explained = torch._dynamo.explain(net)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        torch._dynamo.reset()
    params = [p for p in net.parameters() if p.requires_grad]
    state = {k: v.clone() for k, v in net.state_dict().items()}  # BatchNorm statistics

    eager_out = net(x)
    eager_grads = torch.autograd.grad(_loss(eager_out), params, allow_unused=True)
    net.load_state_dict(state)
    counter = CompileCounterWithBackend("eager" if name in DYNAMO_ONLY else "aot_eager")
    compiled = torch.compile(net, backend=counter, fullgraph=True)  # a graph break raises
    out = compiled(x)
    got_grads = torch.autograd.grad(_loss(out), params, allow_unused=True)
    for a, b in zip(out if isinstance(out, list) else [out],
                    eager_out if isinstance(eager_out, list) else [eager_out]):
        close_to_scale(a, b)
    largest = max(float(g.abs().max()) for g in eager_grads if g is not None)
    for a, b in zip(got_grads, eager_grads):
        assert (a is None) == (b is None)
        if a is not None:  # near-zero gradients (e.g. a 1-unit SE bottleneck) by the largest
            close_to_scale(a, b, floor=1e-5 * largest)
    assert counter.frame_count == 1
    if name in SWITCH_CHECKED:  # nnU-Net: train, validate (eval + no_grad), train, ...
        for _ in range(2):
            net.eval()
            with torch.no_grad():
                compiled(x)
            net.train()
            _loss(compiled(x)).backward()
        assert counter.frame_count == 2, "recompiled after the first train/validation switch"


# ---- GPU: the CUDA backends behind the custom ops (skipped without CUDA) -------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["mamba_ssm", "triton"])
def test_cuda_backend_custom_op_opcheck_and_compiled_network(backend, monkeypatch):
    ok, why = backend_status("cuda")[backend]
    if not ok:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, L, N = 2, 8, 300, 4

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).requires_grad_()

    A = (-torch.rand(d, N, generator=g, device="cuda") - 0.1).requires_grad_()
    for args in ((r(b, d, L), r(b, d, L, scale=0.5), A, r(b, 2, N, L), r(b, 2, N, L), r(d),
                  r(b, d, L), r(d), True, backend),
                 (r(b, d, L), r(b, d, L, scale=0.5), A, r(b, N, L), r(b, N, L), None, None,
                  None, False, backend)):
        torch.library.opcheck(torch.ops.nnunet_mamba.selective_scan_fwd.default, args)
    monkeypatch.setenv(BACKEND_ENV, backend)  # read when the graph is traced
    torch.manual_seed(0)
    net = nnMambaSeg(4, 3, base_channels=8, blocks_per_stage=2, deep_supervision=True).cuda()
    x = torch.randn(2, 4, 32, 32, 32, device="cuda")
    params = list(net.parameters())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.autocast("cuda", dtype=torch.float16):
        ref = net(x)
    ref_grads = torch.autograd.grad(_loss(ref), params)
    net.load_state_dict(state)
    compiled = torch.compile(net, fullgraph=True)  # inductor, as nnU-Net
    with torch.autocast("cuda", dtype=torch.float16):
        out = compiled(x)
    got_grads = torch.autograd.grad(_loss(out), params)
    for a, b_ in zip(out, ref):
        close_to_scale(a.float(), b_.float(), 2e-2)
    for a, b_ in zip(got_grads, ref_grads):
        close_to_scale(a, b_, 5e-2)
