#!/usr/bin/env python
"""Tile shapes and dB/dC copies of the Triton selective scan against mamba-ssm's kernel
(not a test; run on a CUDA machine with mamba-ssm installed).

For each shape (batch, d_inner, L) and each Triton configuration, one forward + backward
through :func:`nnunet_mamba.ssm.selective_scan` (autograd, as a Mamba layer calls it), timed
with CUDA events: the median of ``--reps`` after two warm-up calls, and the same for
``backend='mamba_ssm'``. Configurations set the benchmark knobs of
:mod:`nnunet_mamba.ssm.triton_scan` (``NNUNET_MAMBA_TRITON_TILES``: forward steps per thread,
warps, backward steps per thread, warps; ``NNUNET_MAMBA_TRITON_BWD_COPIES``: copies of
dB/dC; ``NNUNET_MAMBA_TRITON_BWD_GROUP``: tiles per program group of the backward kernel).

Shapes: nnMambaSeg's three Mamba stages at a 128^3 patch, batch 2 x 4 siamese views = 8,
float16 inputs as under AMP (``--shapes nnmamba``), and issue 11's table, batch 2, float32
(``--shapes table``). The last lines name the configuration with the smallest total time
over the nnMamba shapes (``BEST ...``, shell-readable).

    python scripts/tune_triton_scan.py --shapes nnmamba table
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

KNOBS = ("NNUNET_MAMBA_TRITON_TILES", "NNUNET_MAMBA_TRITON_BWD_COPIES", "NNUNET_MAMBA_TRITON_BWD_GROUP")
CONFIGS = {  # name: (tiles, copies, group); "" = the module's default
    "default": ("", "", ""),
    "t8-4": ("8,1,4,1", "", ""),
    "t8-4 c4": ("8,1,4,1", "4", ""),
    "t8-4 c8": ("8,1,4,1", "8", ""),
    "t16-8 c8": ("16,1,8,1", "8", ""),
    "t8-4 g16": ("8,1,4,1", "", "16"),
    "t8-4 c8 g16": ("8,1,4,1", "8", "16"),
    "t8-4 c16 g16": ("8,1,4,1", "16", "16"),
}
SHAPES = {
    "nnmamba": [(8, 128, 32 ** 3, torch.float16), (8, 256, 16 ** 3, torch.float16),
                (8, 512, 8 ** 3, torch.float16)],
    "table": [(2, d, n ** 3, torch.float32) for n in (32, 64) for d in (128, 256, 512)],
}


def inputs(batch, dim, L, dtype, N=16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to("cuda", dtype).requires_grad_(True)

    dt = torch.exp(torch.rand(dim, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    x = {"u": rnd(batch, dim, L), "delta": rnd(batch, dim, L, scale=0.5), "B": rnd(batch, N, L),
         "C": rnd(batch, N, L), "z": rnd(batch, dim, L)}
    w = {"A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1).cuda().requires_grad_(True),
         "D": torch.ones(dim, device="cuda", requires_grad=True),
         "delta_bias": (dt + torch.log(-torch.expm1(-dt))).cuda().requires_grad_(True)}
    return {**x, **w}, torch.randn(batch, dim, L, generator=g).to("cuda", dtype)


def time_ms(backend, args, grad, reps):
    from nnunet_mamba.ssm import selective_scan

    def once():
        out = selective_scan(**args, delta_softplus=True, backend=backend)
        out.backward(grad)

    for _ in range(2):
        once()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        once()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["nnmamba"])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; fwd+bwd ms (median of "
          f"{args.reps}); ratio = triton / mamba_ssm", flush=True)
    totals = {c: 0.0 for c in args.configs}
    for group in args.shapes:
        for batch, dim, L, dtype in SHAPES[group]:
            x, grad = inputs(batch, dim, L, dtype)
            ref = time_ms("mamba_ssm", x, grad, args.reps)
            cells = []
            for name in args.configs:
                for knob, value in zip(KNOBS, CONFIGS[name]):
                    os.environ.pop(knob, None) if not value else os.environ.__setitem__(knob, value)
                ms = time_ms("triton", x, grad, args.reps)
                if group == "nnmamba":
                    totals[name] += ms
                cells.append(f"{name}: {ms:.3f} ({ms / ref:.2f}x)")
            for knob in KNOBS:
                os.environ.pop(knob, None)
            print(f"[{group}] b {batch} d {dim} L {L} {str(dtype)[6:]}: mamba_ssm {ref:.3f} | "
                  + " | ".join(cells), flush=True)
            del x, grad
    if "nnmamba" in args.shapes:
        best = min(totals, key=totals.get)
        print("totals over the nnMamba shapes (ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in totals.items()))
        print("BEST " + " ".join(f"{k}={v}" for k, v in zip(KNOBS, CONFIGS[best])) + f"  # {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
