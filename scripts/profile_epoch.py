"""Where a training iteration's time goes, per trainer (not a test; run on a GPU machine).

For each trainer, built as ``nnUNetv2_train`` builds it (nnU-Net's plans, dataset, workers:
``nnUNet_n_proc_DA``, compile as ``nnUNet_compile`` says), this times, in ms per batch:

- ``loader``: batches from nnU-Net's worker processes into the main process (loading,
  cropping, nnU-Net's CPU augmentation where it runs there, passing between processes,
  pinning) - the rate the CPU side can sustain;
- ``val_loader``: validation batches, ready for ``validation_step``;
- ``gpu_aug``: the batched GPU augmentation of one batch (GPU-path trainers only);
- ``step``: ``train_step`` on one fixed, already augmented batch (the network's share);
- ``iteration``: ``train_step(next(dataloader_train))``, what an epoch's iteration costs.

An iteration costs about ``max(loader, gpu_aug + step)``: whichever is larger bounds the epoch.

    nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... \\
      python scripts/profile_epoch.py DATASET CONFIG TRAINER [TRAINER ...] [--iterations 40]
    NNUNET_MAMBA_GPU_AUGMENTATION_CROP=full  (the whole enlarged patch in float32, for comparison)
    --loader-only: the workers' side only (e.g. on a CPU machine: --device cpu, with
    NNUNET_MAMBA_GPU_AUGMENTATION=1 for the GPU path's loader and nnUNet_n_proc_DA=1 for one worker)
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def _timed(fn, n: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1e3


def profile(dataset: str, configuration: str, trainer_name: str, iterations: int, device: str,
            loader_only: bool = False) -> dict:
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_mamba.training.gpu_augmentation_trainer import GPUAugmentedLoader

    dev = torch.device(device)
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, "nnUNetPlans", device=dev)
    trainer.on_train_start()  # initialise (network, compile), nnU-Net's data loaders and workers
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    outer = trainer.dataloader_train
    gpu_path = isinstance(outer, GPUAugmentedLoader)
    inner = outer.loader if gpu_path else outer
    out = {"trainer": trainer_name, "gpu_augmentation": gpu_path, "workers": os.environ.get("nnUNet_n_proc_DA", "12")}
    for _ in range(3):  # warm-up: compilation, caches, workers' queues
        next(outer) if loader_only else trainer.train_step(next(outer))
    out["loader"] = _timed(lambda: next(inner), iterations, sync)
    raw = next(inner)
    out["loader_MB"] = sum(t.numel() * t.element_size() for t in [raw["data"]] + (
        raw["target"] if isinstance(raw["target"], list) else [raw["target"]])) / 1e6
    if gpu_path:
        data, target = raw["data"].to(dev), raw["target"].to(dev)
        out["gpu_aug"] = _timed(lambda: outer.augmentation(data.clone(), target.clone(),
                                                           spatial=raw.get("spatial")), iterations, sync)
    val = trainer.dataloader_val  # validation batches (on the GPU path: cut and transformed as training's)
    out["val_loader"] = _timed(lambda: next(val), max(1, iterations // 2), sync)
    if not loader_only:
        fixed = next(outer)
        out["step"] = _timed(lambda: trainer.train_step(fixed), iterations, sync)
        out["iteration"] = _timed(lambda: trainer.train_step(next(outer)), iterations, sync)
    if dev.type == "cuda":
        out["peak_GB"] = torch.cuda.max_memory_allocated(dev) / 1e9
    for loader in (inner, getattr(val, "loader", val)):
        if hasattr(loader, "_finish"):
            loader._finish()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("configuration")
    ap.add_argument("trainers", nargs="+")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--loader-only", action="store_true",
                    help="time the workers' batches (and the GPU augmentation) only, no training step")
    args = ap.parse_args(argv)
    crop = os.environ.get("NNUNET_MAMBA_GPU_AUGMENTATION_CROP", "batch")
    for name in args.trainers:
        r = profile(args.dataset, args.configuration, name, args.iterations, args.device, args.loader_only)
        extra = f" | gpu_aug {r['gpu_aug']:.1f}" if "gpu_aug" in r else ""
        if "step" in r:
            extra += f" | step {r['step']:.1f} | iteration {r['iteration']:.1f}"
        print(f"PROFILE {name} (workers {r['workers']}, compile {os.environ.get('nnUNet_compile', 'default')}, "
              f"GPU augmentation {'on, crop ' + crop if r['gpu_augmentation'] else 'off'}): ms per batch: "
              f"loader {r['loader']:.1f} ({r['loader_MB']:.0f} MB/batch) | val_loader {r['val_loader']:.1f}{extra} | peak {r.get('peak_GB', 0):.1f} GB",
              flush=True)


if __name__ == "__main__":
    main()
