"""``nnmamba info``: versions of the stack and which scan backend runs on CPU and CUDA."""
from __future__ import annotations

import importlib.metadata as md


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def add_arguments(parser) -> None:
    pass


def report() -> str:
    import torch

    from .ssm.selective_scan import (BACKEND_ENV, BACKENDS, CUDA_PREFERENCE, backend_status,
                                     resolve_backend)
    from . import _register

    lines = ["nnunet-mamba " + _version("nnunet-mamba")]
    for dist in ("torch", "nnunetv2", "dynamic-network-architectures", "mamba-ssm",
                 "causal-conv1d", "numba", "triton", "SimpleITK"):
        lines.append(f"  {dist:30s} {_version(dist)}")
    lines.append(f"  CUDA available: {torch.cuda.is_available()}"
                 + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    lines.append("selective-scan backends:")
    for dev in ("cpu", "cuda"):
        status = backend_status(dev)
        try:
            chosen = resolve_backend(None, dev)
        except Exception as e:  # forced backend that cannot run
            chosen = f"error: {e}"
        lines.append(f"  {dev}: runs {chosen}")
        for name, (ok, why) in status.items():
            lines.append(f"    {name:10s} {'yes' if ok else 'no '}  {why}")
    lines.append(f"  (default on cuda: the first that runs of {', '.join(CUDA_PREFERENCE)}; "
                 f"force one with {BACKEND_ENV}={'|'.join(BACKENDS)})")
    import os
    lines.append(f"trainer folder registered for nnU-Net: {_register.trainer_folder()}")
    lines.append(f"  nnUNet_extTrainer={os.environ.get('nnUNet_extTrainer', '')}")
    return "\n".join(lines)


def run(args) -> int:
    print(report())
    return 0
