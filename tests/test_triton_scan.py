"""The Triton selective scan (nnunet_mamba.ssm.triton_scan) against the torch backend.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which must be set
before triton is imported: the cases run in one subprocess (this file as a script) and
report max relative errors (max |diff| / max |reference|) against the torch backend in
float64. Tiny sizes; the tile is shrunk so that L spans several tiles and ends inside
one. On CUDA (skipped without it): all dtypes, bigger sizes, L = 1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# (name, options): the interpreter cases; tile = (steps per thread, warps), T = 32 x both
CPU_CASES = {
    "all_options_3_tiles": dict(b=2, d=2, L=300, N=3, tile=(4, 1)),
    "no_options_2_tiles": dict(b=1, d=2, L=150, N=3, z=False, D=False, bias=False,
                               softplus=False, tile=(4, 1)),
    "grouped_BC": dict(b=1, d=4, L=140, N=2, G=2, tile=(4, 1)),
    "B_grouped_C_plain": dict(b=1, d=2, L=40, N=2, G=2, C_plain=True, tile=(4, 1)),
    "L_1": dict(b=2, d=2, L=1, N=3),
    "16_steps_per_thread": dict(b=1, d=1, L=700, N=2, tile=(16, 1)),
    # the backward's channels adding into 3 copies of dB/dC (grouped: 2 channels per group)
    "dB_dC_copies": dict(b=2, d=3, L=140, N=2, tile=(4, 1), copies=3),
    "dB_dC_copies_grouped": dict(b=1, d=4, L=140, N=2, G=2, tile=(4, 1), copies=3),
    # 6 backward tiles in program groups of 4 and 2
    "backward_tile_groups": dict(b=1, d=3, L=700, N=2, tile=(4, 1), group=4),
}


def make_case(b, d, L, N, G=0, z=True, D=True, bias=True, softplus=True, C_plain=False,
              dtype=torch.float64, device="cpu", seed=0, **_):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype)

    bc = (b, G, N, L) if G else (b, N, L)
    inputs = {
        "u": rnd(b, d, L), "delta": rnd(b, d, L, scale=0.5),
        "A": (-4 * torch.rand(d, N, generator=g, dtype=torch.float64)).to(device, torch.float32
                                                                          if dtype != torch.float64 else dtype),
        "B": rnd(*bc), "C": rnd(b, N, L) if C_plain else rnd(*bc),
        "D": rnd(d) if D else None, "z": rnd(b, d, L) if z else None,
        "delta_bias": rnd(d, scale=0.3) if bias else None,
    }
    if not softplus:  # delta must be positive without the softplus (else the state grows)
        inputs["delta"] = inputs["delta"].abs()
    if dtype != torch.float64:  # weights stay float32, as in a Mamba layer under autocast
        for k in ("D", "delta_bias"):
            if inputs[k] is not None:
                inputs[k] = inputs[k].float()
    return inputs, rnd(b, d, L), softplus


def reference(inputs, dout, softplus):
    """out, last state and gradients of the torch backend in float64."""
    from nnunet_mamba.ssm.selective_scan import selective_scan

    x = {k: None if v is None else v.detach().double().requires_grad_(True)
         for k, v in inputs.items()}
    out, last = selective_scan(**x, delta_softplus=softplus, return_last_state=True,
                               backend="torch")
    present = [k for k in NAMES if x[k] is not None]
    grads = torch.autograd.grad(out, [x[k] for k in present], dout.double())
    return out, last, dict(zip(present, grads))


def errors(inputs, dout, softplus, tile=None):
    """{tensor: max |triton - reference| / max |reference|} for out, last and the grads."""
    from nnunet_mamba.ssm import triton_scan

    out_ref, last_ref, grads_ref = reference(inputs, dout, softplus)
    args = [inputs[k] for k in NAMES]
    out, last = triton_scan.selective_scan_forward(*args, delta_softplus=softplus, tile=tile)
    grads = triton_scan.selective_scan_backward(dout, *args, delta_softplus=softplus, tile=tile)
    assert out.dtype == inputs["u"].dtype and last.dtype == torch.float32
    rel = {}
    for name, got, ref in [("out", out, out_ref), ("last_state", last, last_ref)] + [
            ("d" + k, g, grads_ref.get(k)) for k, g in zip(NAMES, grads)]:
        if ref is None:
            assert got is None, f"{name} should be None for an absent input"
            continue
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        expect = torch.float32 if name in ("dA", "dD", "ddelta_bias", "last_state") else \
            inputs[name[1:]].dtype if name.startswith("d") and name[1:] in inputs else got.dtype
        assert got.dtype == expect, (name, got.dtype, expect)
        diff = (got.double().cpu() - ref.double().cpu()).abs().max()
        scale = ref.double().abs().max()  # an exactly zero reference (dA at L = 1): abs error
        rel[name] = (diff / scale if scale > 0 else diff).item()
    return rel


def _interpreter_main() -> None:
    """Run the CPU cases (TRITON_INTERPRET=1 must be set) and print one JSON line."""
    from nnunet_mamba.ssm.triton_scan import COPIES_ENV, GROUP_ENV
    result = {}
    for name, opts in CPU_CASES.items():
        inputs, dout, softplus = make_case(**opts)
        inputs = {k: None if v is None else v.float() for k, v in inputs.items()}
        os.environ[COPIES_ENV] = str(opts.get("copies", 0))
        os.environ[GROUP_ENV] = str(opts.get("group", 0))
        result[name] = errors(inputs, dout.float(), softplus, tile=opts.get("tile"))
    print(json.dumps(result))


@pytest.fixture(scope="module")
def interpreter_errors():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_interpreter_matches_torch_backend(interpreter_errors, case):
    rel = interpreter_errors[case]
    assert {"out", "last_state", "du", "ddelta", "dA", "dB", "dC"} <= set(rel)
    bad = {k: v for k, v in rel.items() if not v <= 1e-5}
    assert not bad, f"{case}: relative errors above 1e-5 (float32 vs float64): {bad}"


def test_status_without_cuda_or_interpreter():
    pytest.importorskip("triton")
    from nnunet_mamba.ssm.triton_scan import triton_status

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    ok, why = triton_status("cpu")
    assert not ok and "CUDA" in why
    ok, why = triton_status("meta")
    assert not ok and "meta" in why


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("L", [1, 777, 4099, 32 ** 3 + 5])
def test_cuda_float32(L):
    inputs, dout, softplus = make_case(b=2, d=32, L=L, N=16, dtype=torch.float32,
                                       device="cuda")
    rel = errors(inputs, dout, softplus)
    bad = {k: v for k, v in rel.items() if not v <= 1e-5}
    assert not bad, f"L={L}: relative errors above 1e-5 (float32 vs float64): {bad}"


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grouped", [False, True])
def test_cuda_half_dtypes(dtype, grouped):
    inputs, dout, softplus = make_case(b=2, d=64, L=5000, N=16, G=2 if grouped else 0,
                                       dtype=dtype, device="cuda")
    rel = errors(inputs, dout.to(dtype), softplus)
    tol = 1e-2 if dtype == torch.float16 else 3e-2  # the outputs are rounded to dtype
    bad = {k: v for k, v in rel.items() if not v <= tol}
    assert not bad, f"{dtype}: relative errors above {tol}: {bad}"


@cuda
def test_cuda_options_off_and_large_d():
    inputs, dout, softplus = make_case(b=1, d=256, L=3000, N=8, z=False, D=False, bias=False,
                                       softplus=False, dtype=torch.float32, device="cuda")
    rel = errors(inputs, dout, softplus)
    bad = {k: v for k, v in rel.items() if not v <= 1e-5}
    assert not bad, f"relative errors above 1e-5: {bad}"


if __name__ == "__main__":
    _interpreter_main()
