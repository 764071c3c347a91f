#!/usr/bin/env python
"""Benchmark of the selective scan: forward+backward time and peak memory per backend.

Compares, at batch B, d_state N and each (d_inner, L):

* the backends of :func:`nnunet_mamba.ssm.selective_scan` that can run on the device
  (``torch``, ``numba`` on CPU; ``mamba_ssm``, ``triton`` and ``torch`` on CUDA);
* ``triton_direct``: the Triton kernels of :mod:`nnunet_mamba.ssm.triton_scan` called
  directly (a bare autograd.Function, no backend dispatch);
* ``ref_loop``: a loop in the style of mamba-ssm's ``selective_scan_ref`` (the (b, d, L, N)
  decays formed up front, indexed inside the Python loop over L; autograd through it,
  whose backward is O(L^2) because every index op scatters into a full-size gradient);
* ``unbind_loop``: a well-written sequential loop (the same tensors cut once with
  ``torch.unbind``, one ``addcmul`` per step, the stacked states contracted with C at
  once; autograd through it).

Every configuration runs in a fresh subprocess: time is wall clock of one forward and
one backward pass (after a small warm-up call that loads compiled kernels), peak memory
is the growth of the process's peak RSS (``ru_maxrss``) over its value after the inputs
were made, i.e. what the scan needs beyond its inputs (on CUDA: the growth of
``torch.cuda.max_memory_allocated``). Configurations predicted to take longer than
``--max-seconds`` (from the same method's smaller runs: time ~ d L, ~ d L^2 for
``ref_loop``) or to need more memory than the machine has free are skipped and say so.

``--check`` instead compares every available backend's outputs and gradients (all inputs,
including D, z, delta_bias) with those of the torch backend, and with a float64 torch run
as exact reference, and prints the max abs / rel errors.

Examples::

    python scripts/bench_scan.py                                  # the full CPU table
    python scripts/bench_scan.py --dims 128 --lengths 32^3 --backends numba torch unbind_loop
    python scripts/bench_scan.py --device cuda --json bench_gpu.json
    python scripts/bench_scan.py --check --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SCAN_BACKENDS = ("torch", "numba", "mamba_ssm", "triton")
#: the Triton kernels called directly (nnunet_mamba.ssm.triton_scan, no backend dispatch)
DIRECT = ("triton_direct",)
LOOPS = ("ref_loop", "unbind_loop")
ALL_METHODS = SCAN_BACKENDS + DIRECT + LOOPS


def parse_length(text: str) -> int:
    """'32768' or '32^3' -> 32768."""
    if "^" in text:
        base, exp = text.split("^")
        return int(base) ** int(exp)
    return int(text)


def length_label(L: int) -> str:
    side = round(L ** (1 / 3))
    return f"{side}^3" if side ** 3 == L else str(L)


# ----------------------------------------------------------------------------------------
# the methods (run inside the worker)
# ----------------------------------------------------------------------------------------
def make_inputs(batch, dim, L, N, device, dtype, seed=0):
    """Inputs as a Mamba block gives them (mamba_ssm's init of A, D and dt_proj.bias)."""
    import math

    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = {
        "u": randn(batch, dim, L),
        "delta": randn(batch, dim, L, scale=0.5),
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1).to(device, dtype),
        "B": randn(batch, N, L),
        "C": randn(batch, N, L),
        "D": torch.ones(dim, device=device, dtype=dtype),
        "z": randn(batch, dim, L),
        "delta_bias": (dt + torch.log(-torch.expm1(-dt))).to(device, dtype),
    }
    for t in inputs.values():
        t.requires_grad_(True)
    grad_out = randn(batch, dim, L)
    return inputs, grad_out


def ref_loop(u, delta, A, B, C, D, z, delta_bias):
    """selective_scan_ref style: index the (b, d, L, N) tensors inside the loop over L."""
    import torch
    import torch.nn.functional as F

    delta = F.softplus(delta + delta_bias[:, None])
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2) + u * D[:, None]
    return y * F.silu(z)


def unbind_loop(u, delta, A, B, C, D, z, delta_bias):
    """A well-written sequential loop: the (b, d, L, N) decays and inputs cut once with
    unbind, one ``addcmul`` per step, the states stacked and contracted with C at once
    (the fastest of the loops we tried: one autograd node per step)."""
    import torch
    import torch.nn.functional as F

    delta = F.softplus(delta + delta_bias[:, None])
    deltaA = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (b, d, L, N)
    deltaB_u = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    states = []
    for a_t, bu_t in zip(deltaA.unbind(2), deltaB_u.unbind(2)):
        x = torch.addcmul(bu_t, a_t, x)
        states.append(x)
    y = torch.einsum("bdln,bnl->bdl", torch.stack(states, dim=2), C)
    return (y + u * D[:, None]) * F.silu(z)


def triton_direct(u, delta, A, B, C, D, z, delta_bias):
    """triton_scan.selective_scan_forward/backward in a bare autograd.Function."""
    import torch

    from nnunet_mamba.ssm import triton_scan

    class Scan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            ctx.save_for_backward(*args)
            return triton_scan.selective_scan_forward(*args, delta_softplus=True)[0]

        @staticmethod
        def backward(ctx, dout):
            return triton_scan.selective_scan_backward(dout, *ctx.saved_tensors,
                                                       delta_softplus=True)

    return Scan.apply(u, delta, A, B, C, D, z, delta_bias)


def run_method(method, inputs):
    from nnunet_mamba.ssm import selective_scan

    if method in LOOPS:
        return (ref_loop if method == "ref_loop" else unbind_loop)(**inputs)
    if method == "triton_direct":
        return triton_direct(**inputs)
    return selective_scan(**inputs, delta_softplus=True, backend=method)


def worker(spec: dict) -> dict:
    """One configuration in this (fresh) process: time and peak memory of fwd+bwd."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    method = spec["method"]
    # warm-up at a small size: loads the compiled kernels, CUDA context, allocator
    small, g_small = make_inputs(spec["batch"], spec["dim"], 64, spec["d_state"], device, dtype)
    run_method(method, small).backward(g_small)
    del small, g_small
    inputs, grad_out = make_inputs(spec["batch"], spec["dim"], spec["L"], spec["d_state"],
                                   device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fwd, total, cpu = [], [], []
    for _ in range(spec["repeat"]):
        for t in inputs.values():
            t.grad = None
        sync()
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        y = run_method(method, inputs)
        sync()
        t1 = time.perf_counter()
        y.backward(grad_out)
        sync()
        t2 = time.perf_counter()
        cpu.append(cpu_seconds() - c0)
        del y
        fwd.append(t1 - t0)
        total.append(t2 - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"fwd_s": min(fwd), "total_s": min(total), "cpu_s": min(cpu), "peak_mb": peak / 2**20}


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------
def available_methods(device: str) -> list[str]:
    from nnunet_mamba.ssm.selective_scan import backend_status

    status = backend_status(device)
    methods = [m for m in SCAN_BACKENDS if status.get(m, (False,))[0]]
    try:
        from nnunet_mamba.ssm.triton_scan import triton_status
        if triton_status(device)[0]:
            methods.append("triton_direct")
    except ImportError:
        pass
    return methods + list(LOOPS)


def mem_available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def loop_memory_estimate(batch, dim, L, N, itemsize) -> float:
    """The loops hold (b, d, L, N) decays, inputs, states and their gradients: measured
    peak about 8.5 x b d L N x itemsize (unbind_loop, L = 32^3)."""
    return 9 * batch * dim * L * N * itemsize


def predict_seconds(method, dim, L, done) -> float | None:
    """Extrapolate from the largest finished run of the same method on the same device."""
    if not done:
        return None
    d0, L0, t0 = max(done, key=lambda r: r[0] * r[1])
    power = 2 if method == "ref_loop" else 1
    return t0 * (dim / d0) * (L / L0) ** power


def run_config(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"skipped (>{timeout:.0f} s)"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"failed: {tail[0][:80]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(args) -> list[dict]:
    import torch

    rows = []
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    timeout = 1.5 * args.max_seconds + 30  # a run past this is stopped and reported
    for device in args.devices:
        methods = [m for m in args.backends if m in available_methods(device)]
        missing = [m for m in args.backends if m not in methods]
        if missing:
            print(f"[{device}] not available: {', '.join(missing)}", flush=True)
        for method in methods:
            done, too_slow = [], []
            for L in sorted(args.lengths):
                for dim in sorted(args.dims):
                    spec = dict(device=device, method=method, batch=args.batch, dim=dim, L=L,
                                d_state=args.d_state, dtype=args.dtype, repeat=args.repeat,
                                threads=args.threads)
                    row = dict(spec)
                    est = predict_seconds(method, dim, L, done)
                    need = loop_memory_estimate(args.batch, dim, L, args.d_state, itemsize)
                    slower_than = [(d0, L0) for d0, L0 in too_slow if dim >= d0 and L >= L0]
                    if slower_than:
                        d0, L0 = slower_than[0]
                        row["skipped"] = (f"skipped (d_inner {d0}, L {length_label(L0)} already "
                                          f"took >{timeout:.0f} s)")
                    elif est is not None and est > args.max_seconds:
                        row["skipped"] = f"skipped (~{est:.0f} s > {args.max_seconds:.0f} s)"
                    elif method in LOOPS and device == "cpu" and need > 0.8 * mem_available_bytes():
                        row["skipped"] = f"skipped (needs ~{need / 2**30:.0f} GB)"
                    else:
                        row.update(run_config(spec, timeout=timeout))
                        if "total_s" in row:
                            done.append((dim, L, row["total_s"]))
                        elif row["skipped"].startswith("skipped (>"):
                            too_slow.append((dim, L))
                    rows.append(row)
                    print(format_row(row), flush=True)
                    if args.json:  # after every row, so an interrupted run keeps its rows
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
    return rows


def format_row(row: dict, speedup: str = "") -> str:
    head = (f"{row['device']:5s} {row['method']:13s} {row['dim']:6d} "
            f"{length_label(row['L']):>7s}")
    if "skipped" in row:
        return f"{head}  {row['skipped']}"
    return (f"{head} {row['fwd_s']:9.3f} {row['total_s'] - row['fwd_s']:9.3f} "
            f"{row['total_s']:9.3f} {row['cpu_s']:9.3f} {row['peak_mb']:10.0f} {speedup:>9s}")


def print_table(rows: list[dict]) -> None:
    ref = {(r["device"], r["dim"], r["L"]): r["total_s"] for r in rows
           if r["method"] == "unbind_loop" and "total_s" in r}
    print("\nbatch {batch}, d_state {d_state}, {dtype}; fwd/bwd/total s: wall clock of one "
          "forward and one backward pass;\ncpu s: CPU time of fwd+bwd, all threads; peak MB: "
          "peak memory beyond the inputs;\nspeed-up: unbind_loop total s / this total s"
          .format(**rows[0]))
    print(f"{'dev':5s} {'method':13s} {'d_inner':>6s} {'L':>7s} {'fwd s':>9s} {'bwd s':>9s} "
          f"{'total s':>9s} {'cpu s':>9s} {'peak MB':>10s} {'speed-up':>9s}")
    for r in sorted(rows, key=lambda r: (r["device"], r["L"], r["dim"],
                                         ALL_METHODS.index(r["method"]))):
        key = (r["device"], r["dim"], r["L"])
        sp = f"{ref[key] / r['total_s']:.2g}x" if key in ref and "total_s" in r else ""
        print(format_row(r, sp))


# ----------------------------------------------------------------------------------------
# --check: every backend against the torch backend
# ----------------------------------------------------------------------------------------
def check(args) -> int:
    import torch

    L = parse_length(args.check_length)
    dim = args.dims[0] if args.dims_given else 64
    names = ["y"] + ["d" + k for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    def outputs(method, device, dtype):
        inputs, grad_out = make_inputs(args.batch, dim, L, args.d_state, device, dtype)
        y = run_method(method, inputs)
        grads = torch.autograd.grad(y, list(inputs.values()), grad_out)
        return [t.detach().double().cpu() for t in (y, *grads)]

    worst = 0.0
    for device in args.devices:
        exact = outputs("torch", device, torch.float64)
        ref = outputs("torch", device, getattr(torch, args.dtype))
        methods = [m for m in available_methods(device)
                   if m in SCAN_BACKENDS + DIRECT and m != "torch"]
        print(f"\n[{device}] batch {args.batch}, d_inner {dim}, L {length_label(L)}, "
              f"d_state {args.d_state}, {args.dtype}; rel = max abs error / max |reference|")
        print(f"{'backend':10s} {'tensor':12s} {'abs vs torch':>13s} {'rel vs torch':>13s} "
              f"{'rel vs f64':>11s}")
        for method in ["torch"] + methods:
            got = outputs(method, device, getattr(torch, args.dtype))
            for name, g, r, e in zip(names, got, ref, exact):
                err = (g - r).abs().max().item()
                rel = err / max(r.abs().max().item(), 1e-30)
                rel64 = (g - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
                if method != "torch":
                    worst = max(worst, rel)
                print(f"{method:10s} {name:12s} {err:13.3e} {rel:13.3e} {rel64:11.3e}")
    print(f"\nworst relative difference to the torch backend: {worst:.3e}")
    return 0


def profile(args) -> int:
    """CUDA kernel times of one forward+backward per method and size (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for L in args.lengths:
        for dim in args.dims:
            for method in [m for m in args.backends if m in available_methods("cuda")]:
                inputs, grad_out = make_inputs(args.batch, dim, L, args.d_state,
                                               torch.device("cuda"), getattr(torch, args.dtype))
                for _ in range(2):  # compile / warm up
                    run_method(method, inputs).backward(grad_out)
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    run_method(method, inputs).backward(grad_out)
                    torch.cuda.synchronize()
                events = prof.key_averages()
                total = sum(e.device_time_total for e in events) / 1e3
                print(f"\n{method}, d_inner {dim}, L {length_label(L)}: "
                      f"{total:.3f} ms of CUDA kernels (fwd+bwd)")
                for e in sorted(events, key=lambda e: -e.device_time_total)[:8]:
                    print(f"  {e.device_time_total / 1e3:9.3f} ms  x{e.count:<3d} {e.key[:70]}")
                del inputs, grad_out
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Examples::")[1])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256], help="d_inner values")
    p.add_argument("--lengths", nargs="+", default=["16^3", "32^3", "64^3"],
                   help="sequence lengths, e.g. 4096 or 16^3")
    p.add_argument("--backends", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS,
                   help="methods to run (those not available on a device are reported)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="'all': cpu, and cuda when available")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per config (min is kept)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in each run (also the numba backend's threads); "
                        "0: torch's default")
    p.add_argument("--max-seconds", type=float, default=300,
                   help="skip configurations predicted (or found) to take longer")
    p.add_argument("--json", metavar="OUT", help="write the rows to this JSON file")
    p.add_argument("--check", action="store_true",
                   help="compare outputs and gradients of every backend with the torch backend")
    p.add_argument("--check-length", default="4096", help="L for --check")
    p.add_argument("--profile", action="store_true",
                   help="print the CUDA kernel times of one fwd+bwd per method (torch.profiler)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.dims_given = "--dims" in (argv if argv is not None else sys.argv)
    args.lengths = [parse_length(x) for x in args.lengths]
    if args.device == "all":
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; use --device cpu",
              file=sys.stderr)
        return 2
    else:
        args.devices = [args.device]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (torch and the numba "
          f"backend), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    if args.check:
        return check(args)
    if args.profile:
        return profile(args)
    rows = benchmark(args)
    if not rows:
        print("nothing to run")
        return 1
    print_table(rows)
    if args.json:
        print(f"rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
