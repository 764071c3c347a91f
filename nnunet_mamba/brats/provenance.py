"""What ``nnmamba brats2023 reproduce`` records in ``reproduce.json`` besides the numbers:
the command line, the protocol as run, and the versions of the software stack."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
from dataclasses import asdict
from pathlib import Path

from .convert import N_FOLDS, PAPER_FOLD, PAPER_FRACTIONS
from .layout import CHANNEL_ORDER, REGIONS, REGIONS_CLASS_ORDER
from .steps import CONFIGURATION, DatasetState

#: ReproduceOptions field -> its command-line option, in the order command_line writes them
#: (``mode`` is written as ``--link`` / ``--copy``; ``src`` and ``dry_run`` are not options here)
OPTION_FLAGS = {"trainers": "--trainers", "dataset_id": "-d", "name": "--name", "folds": "--folds",
                "convention": "--convention", "metrics": "--metrics", "device": "--device", "plans": "--plans",
                "seed": "--seed", "mode": None, "jobs": "-j", "work": "--work", "out": "--out", "gpus": "--gpus",
                "preset": "--preset", "executor": "--executor", "partition": "--partition",
                "gpus_per_job": "--gpus-per-job", "time": "--time"}


def method_key(trainer: str, folds) -> str:
    """Folder name of a row's predictions and metrics: ``<row key>__folds_<f1>_<f2>...``."""
    return f"{trainer}__folds_{'_'.join(map(str, folds))}"


def versions(device: str, slots) -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("nnunet-mamba", "nnunetv2", "torch", "dynamic-network-architectures", "monai", "numpy",
                 "SimpleITK", "mamba-ssm", "causal-conv1d"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import torch

    out["torch_cuda"] = torch.version.cuda
    if device == "cuda" and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def command_line(opts) -> str:
    """The ``nnmamba brats2023 reproduce`` command that gives these options (a ReproduceOptions).

    Every option is written, except those left at a default of None (not given).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(opts)}
    parts = ["nnmamba", "brats2023", "reproduce", str(Path(opts.src).resolve())]
    for name, flag in OPTION_FLAGS.items():
        value = getattr(opts, name)
        if value is None and defaults[name] is None:
            continue
        if flag is None:
            parts.append(f"--{value}")
        elif isinstance(value, (tuple, list)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(Path(value).resolve()) if name in ("work", "out") else str(value)]
    return " ".join(parts)


def protocol_record(opts, dataset: DatasetState, plans_id: str, conf: dict, classes: dict,
                    slots, env: dict, specs=(), plans_by_id=None) -> dict:
    """The protocol as run: data, split, folds, plans, trainers, inference, metrics (for reproduce.json)."""
    from .lesionwise import RULES as LESIONWISE_RULES
    from .metrics import get_convention, hd95_library

    record = dataset.record
    return {
        "paper": "Gong et al. 2024, nnMamba, Sec. 3.2 and Table 1 (BraTS 2023 GLI, 7:1:2 split, nnU-Net)",
        "source": str(Path(opts.src).resolve()),
        "dataset": {"id": opts.dataset_id, "name": dataset.name, "raw": str(dataset.folder)},
        "split": {"seed": record["seed"], "fractions": record.get("fractions", PAPER_FRACTIONS),
                  "counts": {k: len(record[k]) for k in ("train", "val", "test")},
                  "method": record.get("method"), "test_cases": dataset.test_cases},
        "channels": {f"_{i:04d}": m for i, m in enumerate(CHANNEL_ORDER)},
        "regions": {r: list(v) for r, v in REGIONS.items()},
        "regions_class_order": list(REGIONS_CLASS_ORDER),
        "folds": list(opts.folds),
        "folds_meaning": (f"splits_final.json: folds 0-{N_FOLDS - 1} 5-fold CV over train + val; fold "
                          f"{PAPER_FOLD} the paper's train -> val split"),
        "configuration": CONFIGURATION,
        "plans": {"source": opts.plans, "preset": opts.preset, "identifier": plans_id,
                  "patch_size": conf["patch_size"], "batch_size": conf["batch_size"], "spacing": conf["spacing"]},
        "trainers": ({s.given: {"class": f"{classes[s.trainer].__module__}.{s.trainer}", "plans": s.plans_id(plans_id),
                                "row": s.label} for s in specs} if specs else
                     {n: f"{c.__module__}.{c.__name__}" for n, c in classes.items()}),
        "plans_per_row": {p: {k: c[k] for k in ("patch_size", "batch_size", "spacing")}
                          for p, c in (plans_by_id or {}).items()},
        "device": opts.device, "parallel_gpus": list(slots) if opts.device == "cuda" else [],
        "executor": ({"name": "slurm", "partition": opts.partition, "gpus_per_training_job": opts.gpus_per_job or 1,
                      "time": opts.time} if opts.executor == "slurm" else
                     {"name": "local", "at_once": max(1, len(slots))}),
        "inference": ("nnUNetv2_predict -f <folds>: sliding window (step 0.5, Gaussian weighting), mirroring "
                      "test-time augmentation, logits averaged over the folds, sigmoid > 0.5 per region, painted "
                      f"in regions_class_order {list(REGIONS_CLASS_ORDER)}"),
        "metrics": {"blocks": opts.metrics, "lesionwise": LESIONWISE_RULES if opts.metrics != "legacy" else None,
                    "convention": asdict(get_convention(opts.convention)), "hd95": hd95_library(opts.convention),
                    "dice": "2|P&R| / (|P|+|R|) on the region masks",
                    "table": "per region: mean over test cases; Average: mean over WT, TC, ET"},
        "environment": {k: env.get(k) for k in ("nnUNet_compile", "nnUNet_n_proc_DA", "nnUNet_def_n_proc")},
    }
