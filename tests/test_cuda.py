"""CUDA checks (skipped without a GPU): the fused mamba-ssm path against ours.

- the fused selective-scan kernel and the torch backend agree (outputs and gradients);
- a ``mamba_ssm.Mamba`` state_dict loads into :class:`nnunet_mamba.ssm.Mamba` and gives the
  same output on the GPU (fused vs torch backend) and on the CPU;
- nnMambaSeg trains a step under fp16/bf16 autocast without NaN/Inf.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_mamba.ssm import Mamba, selective_scan
from nnunet_mamba.ssm.selective_scan import backend_status

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def fused_available():
    return torch.cuda.is_available() and backend_status("cuda")["mamba_ssm"][0]


needs_fused = pytest.mark.skipif(not fused_available(), reason="mamba-ssm's CUDA kernel not importable")


@needs_fused
@pytest.mark.parametrize("L", [1, 257, 4096])
@pytest.mark.parametrize("with_z", [False, True])
def test_fused_scan_matches_torch_backend(L, with_z):
    torch.manual_seed(0)
    b, d, n = 2, 64, 16
    dev = "cuda"
    u = torch.randn(b, d, L, device=dev, requires_grad=True)
    delta = (0.5 * torch.randn(b, d, L, device=dev)).requires_grad_()
    A = (-torch.rand(d, n, device=dev) * 4).requires_grad_()
    B = torch.randn(b, n, L, device=dev, requires_grad=True)
    C = torch.randn(b, n, L, device=dev, requires_grad=True)
    D = torch.randn(d, device=dev, requires_grad=True)
    z = torch.randn(b, d, L, device=dev, requires_grad=True) if with_z else None
    bias = torch.randn(d, device=dev, requires_grad=True)
    named = [(k, t) for k, t in zip("u delta A B C D z bias".split(), (u, delta, A, B, C, D, z, bias))
             if t is not None]
    inputs = [t for _, t in named]
    outs = {}
    for backend in ("mamba_ssm", "torch"):
        y = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                           backend=backend)
        g = torch.autograd.grad(y.square().sum(), inputs)
        outs[backend] = (y.detach(), g)
    y_f, g_f = outs["mamba_ssm"]
    y_t, g_t = outs["torch"]
    # float32 sums over thousands of steps in another order: compare relative to the scale
    err = ((y_t - y_f).abs().max() / y_f.abs().max()).item()
    assert err < 1e-4, err
    for (name, _), a, b_ in zip(named, g_t, g_f):
        gerr = ((a - b_).abs().max() / b_.abs().max().clamp_min(1e-6)).item()
        assert gerr < 5e-3, (name, gerr)


@needs_fused
def test_mamba_ssm_state_dict_loads_and_predicts_the_same():
    from mamba_ssm import Mamba as RefMamba

    torch.manual_seed(0)
    ref = RefMamba(d_model=32, d_state=16, d_conv=4, expand=2).cuda()
    ours = Mamba(32, d_state=16, d_conv=4, expand=2)
    assert {k: v.shape for k, v in ref.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 500, 32, device="cuda")
    with torch.no_grad():
        y_ref = ref(x)
        y_gpu = ours.cuda()(x)
        ours.scan_backend = "torch"
        y_gpu_torch = ours(x)
        y_cpu = ours.cpu()(x.cpu())
    torch.testing.assert_close(y_gpu, y_ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(y_gpu_torch, y_ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(y_cpu, y_ref.cpu(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nnmamba_trains_under_autocast_without_nan(dtype):
    from nnunet_mamba.networks import nnMambaSeg

    torch.manual_seed(0)
    net = nnMambaSeg(4, 3, deep_supervision=True).cuda()
    opt = torch.optim.Adam(net.parameters(), 2e-3, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x = 50 * torch.randn(2, 4, 64, 64, 64, device="cuda")
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            outs = net(x)
            loss = sum(o.float().square().mean() for o in outs)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in net.parameters())
