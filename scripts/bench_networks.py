#!/usr/bin/env python
"""Training-step and sliding-window benchmark of our networks against nnU-Net's default U-Net.

For each network: ``--iters`` training steps at batch ``--batch`` on 4-channel ``--patch``
inputs (3 output regions, deep supervision, nnU-Net's AMP recipe on CUDA: fp16 autocast and
GradScaler), reporting seconds per iteration (after ``--warmup`` steps) and peak GPU memory;
then sliding-window inference of one 4 x 240 x 240 x 155 volume with nnU-Net's tiling (step
0.5 of the patch, Gaussian importance weighting), with and without nnU-Net's 8-fold mirroring.
The baseline is nnU-Net's default 3d_fullres network for BraTS (PlainConvUNet, 6 stages,
32..320 features), built with dynamic_network_architectures as nnU-Net builds it.

With ``--compile`` every network is also trained as nnU-Net trains it by default on CUDA,
``torch.compile(network)`` (``--compile-backend``, default inductor): the row then has
the compiled step time next to the eager one, the first compiled step (compilation
included), the peak memory of each, the graph breaks and the frames Dynamo compiled: one
for training, one more for the validation switch (eval mode + no_grad), and any further
one is a recompile (``recompiles``, which should be 0).

    python scripts/bench_networks.py --networks nnMambaSeg nnUNet --device cuda
    python scripts/bench_networks.py --compile --no-inference          # eager vs compiled
    python scripts/bench_networks.py --channels-last off ...   # NCDHW activations for all

cuDNN autotuning is on, as nnU-Net's ``run_training`` sets it.
    python scripts/bench_networks.py --compile --device cpu --patch 32 32 32 --batch 1 \
        --iters 2 --warmup 1 --compile-backend aot_eager --no-inference  # a CPU dry run
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F

from nnunet_mamba.ssm import memory_format_of


def nnunet_default_unet(in_ch, out_ch, deep_supervision, n_stages=6):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        in_ch, n_stages, [min(320, 32 * 2 ** i) for i in range(n_stages)], torch.nn.Conv3d,
        3, [1] + [2] * (n_stages - 1), [2] * n_stages, out_ch, [2] * (n_stages - 1),
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)


def build(name, in_ch, out_ch, ds, patch=(128, 128, 128)):
    """'nnUNet', a class in nnunet_mamba.networks ('nnMambaSeg' or 'segmamba:SegMamba'), or
    'trainer:NAME': the network nnU-Net trainer NAME builds for BraTS plans at ``patch``."""
    if name == "nnUNet":
        return nnunet_default_unet(in_ch, out_ch, ds)
    if name.startswith("trainer:"):
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_mamba.model_table import brats_plans
        pm = PlansManager(brats_plans(patch))
        cls = recursive_find_trainer_class_by_name(name.split(":", 1)[1])
        return cls.build_network_architecture(pm, pm.get_configuration("3d_fullres"), in_ch,
                                              out_ch, enable_deep_supervision=ds)
    import importlib
    module, _, cls_name = name.rpartition(":")
    mod = importlib.import_module("nnunet_mamba.networks" + (f".{module}" if module else ""))
    return getattr(mod, cls_name)(in_ch, out_ch, deep_supervision=ds)


class ChannelsLastInput(torch.nn.Module):
    """A network called on channels-last inputs (nnU-Net's U-Net has no switch of its own)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.contiguous(memory_format=torch.channels_last_3d))


def set_layout(net, choice: str) -> str:
    """Apply ``--channels-last`` to ``net`` (in place); returns what the network runs with."""
    if isinstance(net, ChannelsLastInput):
        return "channels_last"
    inner = net
    if hasattr(inner, "channels_last"):  # nnMambaSeg: None = channels-last on CUDA, eager
        if choice != "default":
            inner.channels_last = choice == "on"
        return {None: "channels_last on CUDA when eager", True: "channels_last",
                False: "NCDHW"}[inner.channels_last]
    if choice == "on":
        raise SystemExit("--channels-last on: wrap with ChannelsLastInput (see build)")
    return "NCDHW"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_speed(net, device, batch, patch, iters, warmup, amp=True, model=None):
    """Mean seconds per training step after ``warmup`` steps, peak GiB, first step's seconds.

    ``model`` is what is called (e.g. the compiled ``net``); the optimiser steps ``net``.
    """
    model = net if model is None else model
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    x = torch.randn(batch, 4, *patch, device=device)
    target = (torch.rand(batch, 3, *patch, device=device) > 0.5).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first = [], None
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=use_amp):
            outs = model(x)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            loss = 0
            for w, o in zip([1 / 2 ** k for k in range(len(outs))], outs):
                t = F.interpolate(target, size=o.shape[2:], mode="nearest")
                loss = loss + w * F.binary_cross_entropy_with_logits(o.float(), t)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sync(device)
        first = time.perf_counter() - t0 if first is None else first
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError("non-finite loss")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sum(times) / len(times), peak, first


def compiled_speed(net, device, batch, patch, iters, warmup, backend="inductor", mode=None):
    """The training step of ``torch.compile(net)`` (nnU-Net's default on CUDA) and Dynamo's
    account: graph breaks, frames compiled for training, for a validation forward (eval
    mode, no_grad) and for training again after it (the last should be 0)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(net, backend=backend, mode=mode)
    sec, peak, first = train_speed(net, device, batch, patch, iters, warmup, model=model)
    frames_train = counters["frames"]["total"]
    net.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        model(torch.randn(batch, 4, *patch, device=device))
    frames_eval = counters["frames"]["total"] - frames_train
    net.train()
    train_speed(net, device, batch, patch, 1, 0, model=model)
    frames_again = counters["frames"]["total"] - frames_train - frames_eval
    breaks = sum(counters["graph_break"].values())
    return {"compiled_s_per_iter": round(sec, 4), "compiled_first_iter_s": round(first, 2),
            "compiled_peak_GiB": round(peak, 2), "graph_breaks": breaks,
            "frames_train": frames_train, "frames_eval": frames_eval,
            "recompiles": frames_again + max(0, frames_train - 1) + max(0, frames_eval - 1)}


def gaussian_weights(patch, device, sigma_scale=1 / 8):
    axes = [torch.arange(p, device=device, dtype=torch.float32) - (p - 1) / 2 for p in patch]
    g = 1.0
    for k, a in enumerate(axes):
        shape = [1, 1, 1]
        shape[k] = -1
        g = g * torch.exp(-0.5 * (a / (patch[k] * sigma_scale)) ** 2).reshape(shape)
    g = g / g.max()
    return g.clamp_min(g[g > 0].min())


def tile_starts(size, patch, step=0.5):
    """nnU-Net's tile positions: evenly spaced, at most ``step * patch`` apart."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * step)) + 1
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


@torch.no_grad()
def sliding_window_seconds(net, device, patch, volume=(155, 240, 240), mirror=False):
    net.eval()
    x = torch.randn(1, 4, *volume, device=device)
    w = gaussian_weights(patch, device)
    acc = torch.zeros(1, 3, *volume, device=device)
    norm = torch.zeros(1, 1, *volume, device=device)
    flips = [()]
    if mirror:
        flips = [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)]
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        for z, y, xx in itertools.product(*(tile_starts(s, p) for s, p in zip(volume, patch))):
            sl = (slice(None), slice(None), slice(z, z + patch[0]), slice(y, y + patch[1]),
                  slice(xx, xx + patch[2]))
            tile = x[sl]
            pred = 0
            for f in flips:
                out = net(tile.flip(f) if f else tile)
                out = out[0] if isinstance(out, (list, tuple)) else out
                pred = pred + (out.flip(f) if f else out).float()
            acc[sl] += pred / len(flips) * w
            norm[sl] += w
    _ = (acc / norm).argmax(1)
    sync(device)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=["nnMambaSeg", "nnUNet"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="also time the training step of torch.compile(network)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor as nnU-Net; aot_eager for a CPU dry run)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default: nnU-Net's, None; e.g. reduce-overhead = CUDA graphs)")
    p.add_argument("--channels-last", choices=["default", "on", "off"], default="default",
                   help="activation layout: the network's default (nnMambaSeg: channels-last on "
                        "CUDA; nnU-Net's U-Net: NCDHW), or forced for every network")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # as nnU-Net's run_training sets them
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    patch = tuple(args.patch)
    rows = []
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, batch {args.batch}, patch {patch}, AMP fp16 "
          f"{device.type == 'cuda'}" + (f", compile backend {args.compile_backend} mode {args.compile_mode}"
                                        if args.compile else ""), flush=True)
    if device.type == "cuda":
        from nnunet_mamba.ssm import resolve_backend
        print(f"selective-scan backend on cuda: {resolve_backend(None, device)}", flush=True)
    for name in args.networks:
        torch.manual_seed(0)
        try:
            net = build(name, 4, 3, True, patch).to(device)
        except (ValueError, TypeError):  # networks without deep supervision (SegMamba, UNETR)
            net = build(name, 4, 3, False, patch).to(device)
        if args.channels_last == "on" and not hasattr(net, "channels_last"):
            net = ChannelsLastInput(net.to(memory_format=torch.channels_last_3d))
        params = sum(q.numel() for q in net.parameters()) / 1e6
        layout = set_layout(net, args.channels_last)
        sec, peak, _ = train_speed(net, device, args.batch, patch, args.iters, args.warmup)
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            out = net(torch.randn(1, 4, *patch, device=device))
        out = out[0] if isinstance(out, (list, tuple)) else out
        layout += " (output NCDHW)" if memory_format_of(out) == torch.contiguous_format \
            else " (output channels-last)"
        row = {"network": name, "params_M": round(params, 2), "layout": layout,
               "s_per_iter": round(sec, 4), "peak_GiB": round(peak, 2)}
        if args.compile:
            row.update(compiled_speed(net, device, args.batch, patch, args.iters,
                                      max(args.warmup, 3), args.compile_backend, args.compile_mode))
        if not args.no_inference:
            inner = net.net if isinstance(net, ChannelsLastInput) else net
            if hasattr(inner, "decoder"):
                inner.decoder.deep_supervision = False
            row["sliding_window_s"] = round(sliding_window_seconds(net, device, patch), 2)
            row["sliding_window_mirror8_s"] = round(
                sliding_window_seconds(net, device, patch, mirror=True), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
