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

``--diagnose`` (CUDA) adds the step's phases (forward, loss, backward, optimiser: GPU ms
from CUDA events against the host's ms to queue them) and the places where the host waits
for the GPU during an iteration (``torch.cuda.set_sync_debug_mode``).

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


def _phases(trainer, batch: dict, n: int) -> dict:
    """GPU-side ms (CUDA events, no host wait in between) and host-side ms (queueing the
    work) per phase of nnU-Net's training step on one fixed batch: forward, loss, backward,
    unscale + clip + optimiser. A phase whose host time reaches its GPU time is bound by
    kernel launches, not by the GPU."""
    names = ("forward", "loss", "backward", "optimizer")
    gpu, host = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    net = getattr(trainer, "training_network", trainer.network)  # CUDA graphs where the trainer uses them
    graphed = net is not trainer.network
    opt, scaler = trainer.optimizer, trainer.grad_scaler
    data, target = batch["data"], batch["target"]
    torch.cuda.synchronize()
    for _ in range(n):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)]
        stamps = [time.perf_counter()]
        events[0].record()
        opt.zero_grad(set_to_none=True)
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda"):
            output = net(data)
            stamps.append(time.perf_counter()), events[1].record()
            loss = trainer.loss(output, target)
        stamps.append(time.perf_counter()), events[2].record()
        scaler.scale(loss).backward()
        stamps.append(time.perf_counter()), events[3].record()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(opt)
        scaler.update()
        stamps.append(time.perf_counter()), events[4].record()
        torch.cuda.synchronize()
        for i, name in enumerate(names):
            gpu[name] += events[i].elapsed_time(events[i + 1]) / n
            host[name] += (stamps[i + 1] - stamps[i]) * 1e3 / n
    return {"gpu": gpu, "host": host}


def _sync_points(fn, n: int) -> dict:
    """{'file:line': count} of the operations that made the host wait for the GPU in ``n``
    calls of ``fn`` (``torch.cuda.set_sync_debug_mode('warn')``)."""
    import warnings
    counts: dict = {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            key = f"{os.path.relpath(w.filename)}:{w.lineno}"
            counts[key] = counts.get(key, 0) + 1
    return {k: v / n for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def profile(dataset: str, configuration: str, trainer_name: str, iterations: int, device: str,
            loader_only: bool = False, diagnose: bool = False) -> dict:
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
        if diagnose and dev.type == "cuda":
            out["phases"] = _phases(trainer, fixed, iterations)
            out["syncs"] = _sync_points(lambda: trainer.train_step(next(outer)), 3)
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
    ap.add_argument("--diagnose", action="store_true",
                    help="CUDA: also the step's phases (GPU vs host ms) and where the host waits for the GPU")
    args = ap.parse_args(argv)
    crop = os.environ.get("NNUNET_MAMBA_GPU_AUGMENTATION_CROP", "batch")
    for name in args.trainers:
        r = profile(args.dataset, args.configuration, name, args.iterations, args.device, args.loader_only,
                    args.diagnose)
        extra = f" | gpu_aug {r['gpu_aug']:.1f}" if "gpu_aug" in r else ""
        if "step" in r:
            extra += f" | step {r['step']:.1f} | iteration {r['iteration']:.1f}"
        print(f"PROFILE {name} (workers {r['workers']}, compile {os.environ.get('nnUNet_compile', 'default')}, "
              f"GPU augmentation {'on, crop ' + crop if r['gpu_augmentation'] else 'off'}): ms per batch: "
              f"loader {r['loader']:.1f} ({r['loader_MB']:.0f} MB/batch) | val_loader {r['val_loader']:.1f}{extra} | peak {r.get('peak_GB', 0):.1f} GB",
              flush=True)
        if "phases" in r:
            ph = r["phases"]
            print(f"PHASES {name}: ms GPU / host: " + " | ".join(
                f"{k} {ph['gpu'][k]:.1f} / {ph['host'][k]:.1f}" for k in ph["gpu"]), flush=True)
            print(f"SYNCS {name} (host waits per iteration, by caller): "
                  + (", ".join(f"{k} x{v:g}" for k, v in r["syncs"].items()) or "none"), flush=True)


if __name__ == "__main__":
    main()
