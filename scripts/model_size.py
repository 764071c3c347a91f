#!/usr/bin/env python
"""Parameters and GMACs (multiply-adds of convolutions and linear layers) of our networks.

MACs are counted with forward hooks on Conv/ConvTranspose/Linear modules while the network
runs on PyTorch's ``meta`` device (shapes only, no arithmetic), so even 128^3 inputs take
seconds on a CPU. The selective scan itself (O(L * d_inner * d_state)) is not counted, as
in the papers' numbers. ``--fvcore`` cross-checks with fvcore's tracer on a real CPU
forward (slow at 128^3).

    python scripts/model_size.py nnMambaSeg --in-channels 1 --classes 16 --patch 128 128 128
    python scripts/model_size.py --trainers-table      # the README table (BraTS plans)
"""
from __future__ import annotations

import argparse

import torch

from nnunet_mamba.model_table import count_macs, count_params, trainers_table


def build(name: str, in_channels: int, classes: int, patch):
    from nnunet_mamba import networks

    cls = getattr(networks, name)
    return cls(in_channels, classes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("network", nargs="?", default="nnMambaSeg",
                   help="class name in nnunet_mamba.networks")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fvcore", action="store_true", help="also count with fvcore (slow)")
    p.add_argument("--trainers-table", action="store_true",
                   help="every registered trainer's network at BraTS plans (4 in, 3 regions)")
    args = p.parse_args(argv)
    if args.trainers_table:
        print(trainers_table(args.patch))
        return 0
    net = build(args.network, args.in_channels, args.classes, args.patch)
    params = count_params(net)
    shape = (args.batch, args.in_channels, *args.patch)
    macs = count_macs(net, shape)
    print(f"{args.network}: {params / 1e6:.2f} M parameters, {macs / 1e9:.2f} GMACs at input {shape}")
    if args.fvcore:
        from fvcore.nn import FlopCountAnalysis
        net = build(args.network, args.in_channels, args.classes, args.patch).eval()
        fl = FlopCountAnalysis(net, torch.zeros(shape))
        fl.unsupported_ops_warnings(False)
        fl.uncalled_modules_warnings(False)
        by_op = fl.by_operator()
        print(f"fvcore: {fl.total() / 1e9:.2f} G total; conv+linear "
              f"{(by_op.get('conv', 0) + by_op.get('linear', 0)) / 1e9:.2f} G")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
