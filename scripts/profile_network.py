#!/usr/bin/env python
"""Where a network's training step spends its GPU time (not a test; run on a CUDA machine).

Builds each network as ``scripts/bench_networks.py`` does (batch 2, 4 x ``--patch``, 3 output
regions, deep supervision, AMP fp16 + GradScaler, SGD, cuDNN autotuning as nnU-Net sets it),
optionally ``torch.compile``-s it (``--compile``, nnU-Net's default), warms up, then records
``--steps`` steps with ``torch.profiler`` and prints per step: the wall time, the summed CUDA
kernel time, the number of kernels, the kernel time by kind (convolutions, selective scan,
matrix products, normalisation, interpolation, layout copies, other elementwise/fused) and
the largest kernels.

    python scripts/profile_network.py --networks nnMambaSeg nnUNet --compile
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_networks import build  # noqa: E402

KINDS = [  # (kind, substrings of the kernel name), first match wins
    ("selective scan", ("selective_scan", "_fwd_kernel", "_bwd_kernel", "_state_kernel", "_carry_kernel",
                        "causal_conv1d")),
    ("convolution", ("conv", "implicit_gemm", "sm90_xmma", "cudnn", "dgrad", "wgrad", "fprop")),
    ("matrix product", ("gemm", "cutlass", "sm90_", "nvjet", "ampere_", "cublas")),
    ("normalisation", ("batch_norm", "batchnorm", "instance_norm", "native_batch_norm", "welford", "_norm")),
    ("interpolation", ("upsample", "interpolate", "_unsafe_index", "grid_sampler")),
    ("layout copy", ("nchwtonhwc", "nhwctonchw", "transpose", "copy_", "elementwise_kernel_with_index",
                     "clone", "permute", "cat")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other elementwise / fused"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=["nnMambaSeg", "nnUNet"])
    p.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    for name in args.networks:
        torch.manual_seed(0)
        try:
            net = build(name, 4, 3, True, tuple(args.patch)).to(dev)
        except (ValueError, TypeError):
            net = build(name, 4, 3, False, tuple(args.patch)).to(dev)
        model = torch.compile(net) if args.compile else net
        opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
        scaler = torch.amp.GradScaler("cuda")
        x = torch.randn(2, 4, *args.patch, device=dev)
        target = (torch.rand(2, 3, *args.patch, device=dev) > 0.5).float()

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda"):
                outs = model(x)
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                loss = sum(F.binary_cross_entropy_with_logits(
                    o.float(), F.interpolate(target, size=o.shape[2:], mode="nearest")) / 2 ** k
                    for k, o in enumerate(outs))
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(opt)
            scaler.update()

        for _ in range(6):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.device_time_total for e in events) / 1e3 / args.steps
        count = sum(e.count for e in events) / args.steps
        by_kind = defaultdict(float)
        for e in events:
            by_kind[kind_of(e.key)] += e.device_time_total / 1e3 / args.steps
        print(f"\n== {name} ({'compiled' if args.compile else 'eager'}), batch 2, 4 x {tuple(args.patch)}: "
              f"{wall:.1f} ms per step (profiled), {total:.1f} ms of CUDA kernels, {count:.0f} kernels")
        for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {ms:8.2f} ms {100 * ms / total:5.1f} %  {kind}")
        print("  largest kernels (ms per step, calls per step):")
        for e in sorted(events, key=lambda e: -e.device_time_total)[:args.top]:
            print(f"  {e.device_time_total / 1e3 / args.steps:8.2f} x{e.count // args.steps:<4d} "
                  f"[{kind_of(e.key)}] {e.key[:90]}")
        del net, model, opt
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
