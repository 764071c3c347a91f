"""Network size: parameters and MACs, and the README's trainers table at BraTS plans.

MACs (multiply-adds of convolutions and linear layers) are counted with forward hooks while
the network runs on PyTorch's ``meta`` device (shapes only), so 128^3 inputs take seconds.

The plans are nnU-Net's default 3d_fullres plans for BraTS (4 input channels, 3 regions,
1 mm, patch 128^3, batch 2, PlainConvUNet with 6 stages of 32..320 features), built as a
plans dict here so that no dataset is needed. Each trainer builds its network through its
own ``build_network_architecture`` (as nnU-Net does), without deep supervision.
"""
from __future__ import annotations

import math
from unittest import mock

import torch
from torch import nn


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def count_macs(net: nn.Module, input_shape) -> int:
    """Multiply-adds of every Conv*/Linear call during one forward on the meta device."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            x = inp[0]
            total += x.numel() * math.prod(m.kernel_size) * (m.out_channels // m.groups)
        else:
            total += out.numel() * k

    def linear_hook(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    def dt_proj_hook(branch):  # SSMBranch applies dt_proj.weight functionally
        def hook(m, inp, out):
            nonlocal total
            total += (out.numel() // out.shape[-1]) * branch.dt_proj.weight.numel()
        return hook

    from nnunet_mamba.ssm import SSMBranch

    hooks = []
    for m in net.modules():
        if isinstance(m, SSMBranch):
            hooks.append(m.x_proj.register_forward_hook(dt_proj_hook(m)))
        if isinstance(m, nn.modules.conv._ConvNd):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    net = net.to("meta").eval()
    # the scan has no MACs to count and no meta kernel: give back u, its output's shape
    scan_stub = mock.patch("nnunet_mamba.ssm.mamba.selective_scan", lambda u, *a, **k: u)
    try:
        with torch.no_grad(), scan_stub:
            net(torch.empty(*input_shape, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


def brats_plans(patch=(128, 128, 128)) -> dict:
    n = 6
    return {
        "dataset_name": "Dataset137_BraTS2023", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [140, 171, 137],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [140, 171, 137],
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"] * 4,
            "use_mask_for_norm": [True] * 4, "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": [min(320, 32 * 2 ** i) for i in range(n)],
                    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                    "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
                    "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                    "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }


#: nnU-Net's configurations, in the order nnUNetv2_plan_and_preprocess makes them
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def configuration_plans(patch=(128, 128, 128)) -> dict:
    """:func:`brats_plans` with all four configurations: ``2d`` (patch = the last two axes,
    nnU-Net's 2D U-Net with 2D ops), ``3d_lowres`` (half the resolution) and
    ``3d_cascade_fullres`` (3d_fullres with the low-resolution segmentation as extra input)."""
    import copy

    plans = brats_plans(patch)
    full = plans["configurations"]["3d_fullres"]
    two_d = copy.deepcopy(full)
    arch = two_d["architecture"]["arch_kwargs"]
    n = arch["n_stages"]
    arch.update(conv_op="torch.nn.modules.conv.Conv2d", kernel_sizes=[[3, 3]] * n,
                strides=[[1, 1]] + [[2, 2]] * (n - 1),
                norm_op="torch.nn.modules.instancenorm.InstanceNorm2d")
    two_d.update(data_identifier="nnUNetPlans_2d", patch_size=list(patch[1:]), batch_size=12,
                 spacing=full["spacing"][1:], median_image_size_in_voxels=full["median_image_size_in_voxels"][1:])
    low = copy.deepcopy(full)
    low.update(data_identifier="nnUNetPlans_3d_lowres", spacing=[2 * s for s in full["spacing"]],
               next_stage="3d_cascade_fullres")
    plans["configurations"].update({
        "2d": two_d, "3d_lowres": low,
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}})
    return plans


def supported_configurations(trainer: type, patch=(128, 128, 128)) -> list[str]:
    """The configurations whose network ``trainer`` builds (on the meta device: shapes only)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(configuration_plans(patch))
    out = []
    for name in CONFIGURATIONS:
        cm = pm.get_configuration(name)
        n_in = 4 + (3 if name == "3d_cascade_fullres" else 0)  # + the previous stage's labels
        try:
            with torch.device("meta"):
                trainer.build_network_architecture(pm, cm, n_in, 3, enable_deep_supervision=False)
        except (ValueError, NotImplementedError):
            continue
        out.append(name)
    return out


def trainers_table(patch=(128, 128, 128)) -> str:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from .nnunet.trainers import our_trainers

    pm = PlansManager(brats_plans(patch))
    cm = pm.get_configuration("3d_fullres")
    rows = ["| trainer | network | params | GMACs | configurations |", "|---|---|---|---|---|"]
    for cls in [nnUNetTrainer, *our_trainers(base_only=True)]:
        net = cls.build_network_architecture(pm, cm, 4, 3, enable_deep_supervision=False)
        params = count_params(net)
        macs = count_macs(net, (1, 4, *patch))
        configs = ", ".join(supported_configurations(cls, patch))
        rows.append(f"| `{cls.__name__}` | `{type(net).__name__}` | {params / 1e6:.2f} M | "
                    f"{macs / 1e9:.1f} | {configs} |")
    return "\n".join(rows)
