"""``nnmamba plans``: apply a plans preset to a planned nnU-Net dataset.

A preset (JSON in the ``plans/`` folder, e.g. ``paper``) changes one configuration of
nnU-Net's planned plans -- patch size and batch size -- and writes them under a new plans
identifier (``<source>_<suffix>``, for ``nnUNetv2_train -p``). The network topology that
nnU-Net's own trainers read from the plans (stages, pooling, kernel sizes) is recomputed
for the new patch with nnU-Net's planner function ``get_pool_and_conv_props``, so
``nnUNetTrainer`` on the same plans is a fair baseline. The spacing and the preprocessed
data are unchanged: no new preprocessing is needed.

    nnmamba plans apply paper -d 501          # writes nnUNetPlans_nnMambaPaper.json
    nnUNetv2_train 501 3d_fullres 0 -tr nnMambaTrainer -p nnUNetPlans_nnMambaPaper
"""
from __future__ import annotations

import copy
import importlib.resources
import json
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..safe_io import atomic_write_text, load_json
from .folders import find_dataset_folder


def available_presets() -> dict[str, dict]:
    root = importlib.resources.files("nnunet_mamba_plans")
    return {p.name[:-5]: json.loads(p.read_text()) for p in root.iterdir() if p.name.endswith(".json")}


def resolve_preset(value: str) -> tuple[str, dict]:
    """A preset by name (``nnmamba plans list``) or from a JSON file with the same keys:
    (its name or the file's absolute path, the preset); raises :class:`UserError`."""
    presets = available_presets()
    if value in presets:
        return value, presets[value]
    path = Path(value)
    if path.suffix == ".json" and path.is_file():
        try:
            preset = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"preset file {path} is not valid JSON ({e})") from None
        needed = ("configuration", "patch_size", "batch_size", "plans_suffix")
        lacking = [k for k in needed if k not in preset]
        if lacking:
            raise UserError(f"preset file {path} lacks {', '.join(lacking)}; a preset holds {', '.join(needed)} "
                            f"(see nnunet_mamba_plans/paper.json)")
        return str(path.resolve()), preset
    raise UserError(f"unknown --preset {value!r}: use one of {', '.join(sorted(presets))} or a preset .json file")


def _extend(seq, n):
    seq = list(seq)
    return (seq + [seq[-1]] * n)[:n]


def apply_preset(plans: dict, preset: dict) -> tuple[dict, list[str]]:
    """Return (new plans, notes). ``plans`` is nnU-Net's plans dict; it is not modified."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    conf_name = preset["configuration"]
    if conf_name not in plans["configurations"]:
        raise UserError(f"the plans have no configuration {conf_name!r} "
                        f"(have: {', '.join(plans['configurations'])})")
    new = copy.deepcopy(plans)
    conf = new["configurations"][conf_name]
    if "inherits_from" in conf:
        raise UserError(f"configuration {conf_name!r} inherits from another; apply the preset to "
                        f"{conf['inherits_from']!r}")
    notes = []
    spacing = conf["spacing"]
    want = list(preset["patch_size"])
    if len(want) != len(spacing):
        raise UserError(f"preset patch {want} does not match the {len(spacing)}D configuration")
    _, pools, kernels, patch, _ = get_pool_and_conv_props(spacing, want, 4, 999999)
    patch = [int(p) for p in patch]
    if patch != want:
        notes.append(f"patch {want} is not divisible by the pooling nnU-Net plans for spacing "
                     f"{spacing}; using {patch}")
    conf["patch_size"] = patch
    conf["batch_size"] = int(preset["batch_size"])
    arch = conf["architecture"]["arch_kwargs"]
    needed = ("features_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder")
    if not all(k in arch for k in needed):
        notes.append(f"architecture {conf['architecture'].get('network_class_name')} has no U-Net "
                     "topology kwargs; only patch and batch size changed")
        new["plans_name"] = f"{plans['plans_name']}_{preset['plans_suffix']}"
        return new, notes
    n = len(pools)
    feats = list(arch["features_per_stage"])
    arch.update({
        "n_stages": n,
        "features_per_stage": [min(max(feats), feats[0] * 2 ** i) for i in range(n)],
        "kernel_sizes": [list(map(int, k)) for k in kernels],
        "strides": [list(map(int, s)) for s in pools],
        "n_conv_per_stage": _extend(arch["n_conv_per_stage"], n),
        "n_conv_per_stage_decoder": _extend(arch["n_conv_per_stage_decoder"], n - 1),
    })
    new["plans_name"] = f"{plans['plans_name']}_{preset['plans_suffix']}"
    return new, notes


def patch_warnings(plans: dict, configuration: str) -> list[str]:
    """Warnings for a configuration whose patch exceeds the median image size on some axis."""
    conf = plans["configurations"][configuration]
    patch, median = conf.get("patch_size"), conf.get("median_image_size_in_voxels")
    if not patch or median is None or len(median) != len(patch) or all(p <= m for p, m in zip(patch, median)):
        return []
    return [f"patch {list(patch)} is larger than the median image size {[int(round(m)) for m in median]} "
            f"(voxels at spacing {conf.get('spacing')}) along some axis: training patches would be mostly "
            "padding. Use a preset with a smaller patch, or keep nnU-Net's planned patch"]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    ap = sub.add_parser("apply", help="write a new plans file from a preset")
    ap.add_argument("preset", help="preset name (see 'nnmamba plans list')")
    ap.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name")
    ap.add_argument("--source", default="nnUNetPlans", help="plans identifier to start from")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing output plans file that differs from the preset's result")
    sub.add_parser("list", help="list the presets")


def run(args) -> int:
    presets = available_presets()
    if args.action == "list":
        for name, p in sorted(presets.items()):
            print(f"{name}: {p['description']}")
        return 0
    if args.preset not in presets:
        raise UserError(f"unknown preset {args.preset!r}; known: {', '.join(sorted(presets))}")
    folder = find_dataset_folder(args.dataset)
    src = folder / f"{args.source}.json"
    if not src.exists():
        raise UserError(f"{src} does not exist: run nnUNetv2_plan_and_preprocess -d {args.dataset} first")
    new, notes = apply_preset(load_json(src, "re-run nnUNetv2_plan_and_preprocess"), presets[args.preset])
    out = folder / f"{new['plans_name']}.json"
    if os.path.realpath(out) == os.path.realpath(src):
        raise UserError(f"the preset would write its plans onto the source {src}; choose another --source")
    if os.path.lexists(out):
        try:
            same = load_json(out) == new
        except UserError:
            same = False
        if not same and not getattr(args, "overwrite", False):
            raise UserError(f"{out} already exists and differs from what preset {args.preset} gives (edited by "
                            "hand, or made from other plans); pass --overwrite to replace it, or rename it")
    atomic_write_text(out, json.dumps(new, indent=2), overwrite=True)
    for note in notes:
        print(f"note: {note}")
    for warning in patch_warnings(new, presets[args.preset]["configuration"]):
        print(f"warning: {warning}", file=sys.stderr)
    conf = new["configurations"][presets[args.preset]["configuration"]]
    print(f"wrote {out}\n  {presets[args.preset]['configuration']}: patch {conf['patch_size']}, "
          f"batch {conf['batch_size']}\nuse it with: nnUNetv2_train {args.dataset} "
          f"{presets[args.preset]['configuration']} FOLD -tr nnMambaTrainer -p {new['plans_name']}")
    return 0
