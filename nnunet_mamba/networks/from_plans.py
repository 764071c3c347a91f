"""nnU-Net plans -> network arguments: what the networks read from a plans configuration.

* :func:`plans_levels`: strides and kernel sizes of a plans configuration for the networks
  with a fixed maximum depth (nnMamba, SegMamba); :class:`PlansConfigurationError` when the
  plans cannot serve the network (the trainer adds the alternatives, see
  :meth:`nnunet_mamba.training.base.MambaTrainerBase.initialize`).
* :func:`unet_kwargs_from_plans`: the keyword arguments of the plans' U-Net (classes
  imported) for the networks built on it (Taming Mambas, U-Mamba).
"""
from __future__ import annotations

import pydoc

import torch.nn as nn


class PlansConfigurationError(ValueError):
    """A network cannot be built for an nnU-Net configuration; the trainer adds its name,
    the configuration and the alternative to the message (see ``training/base.py``)."""


def plans_levels(configuration_manager, max_levels: int, network: str,
                 min_levels: int = 2) -> tuple[list[list[int]], list[list[int]]]:
    """Strides (``pool_op_kernel_sizes[1:max_levels + 1]``) and kernel sizes
    (``conv_kernel_sizes[:len(strides) + 1]``) of a plans configuration, for networks with a
    fixed maximum number of down-samplings. Raises :class:`PlansConfigurationError` when the
    plans pool fewer than ``min_levels`` times. Plans whose architecture has no U-Net strides
    (another ``network_class_name``) give the isotropic default: strides 2, kernels 3, in the
    patch's dimensionality."""
    arch = configuration_manager.network_arch_init_kwargs
    if "strides" not in arch or "kernel_sizes" not in arch:
        dim = len(configuration_manager.patch_size)
        return [[2] * dim] * max_levels, [[3] * dim] * (max_levels + 1)
    pools = [list(p) for p in arch["strides"]]
    kernels = [list(k) for k in arch["kernel_sizes"]]
    strides = pools[1:max_levels + 1]
    if len(strides) < min_levels:
        raise PlansConfigurationError(
            f"{network} needs at least {min_levels} poolings but the plans' configuration pools "
            f"{len(pools) - 1} times (patch size {list(configuration_manager.patch_size)}); a "
            "larger patch size in the plans gives more stages")
    return strides, kernels[:len(strides) + 1]


def unet_kwargs_from_plans(configuration_manager) -> dict:
    """The U-Net keyword arguments of an nnU-Net plans configuration, classes imported.

    Reads ``configuration_manager.network_arch_init_kwargs`` (nnU-Net >= 2.4 plans: plain
    ``PlainConvUNet`` plans or residual-encoder plans) and resolves the class names listed in
    ``_kw_requires_import`` as nnU-Net's ``get_network_from_plans`` does. The encoder's block
    counts are returned as ``n_blocks_per_stage`` whichever name the plans use. 2D
    (``2d``) and 3D configurations are accepted: the Mamba layers scan volumes or images.
    """
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    if "n_blocks_per_stage" not in kwargs:
        if "n_conv_per_stage" not in kwargs:
            raise ValueError("the plans' architecture has neither n_conv_per_stage nor "
                             "n_blocks_per_stage; re-plan the dataset with nnUNetv2_plan_experiment")
        kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
    if kwargs.get("conv_op") not in (nn.Conv2d, nn.Conv3d):
        raise ValueError(
            f"these Mamba networks need a 2D or 3D configuration (conv_op Conv2d or Conv3d), the "
            f"plans give {kwargs.get('conv_op')}; re-plan the dataset with nnUNetv2_plan_experiment")
    for key in ("block", "bottleneck_channels", "stem_channels"):
        kwargs.pop(key, None)  # residual-encoder extras that these networks fix themselves
    return kwargs
