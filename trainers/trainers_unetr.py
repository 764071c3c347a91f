"""UNETRTrainer: MONAI's UNETR (Hatamizadeh et al., WACV 2022) inside stock nnU-Net v2.

The UNETR baseline of the nnMamba paper's BraTS 2023 comparison (Table 1), trained with
nnU-Net's data pipeline, augmentation, splits and inference like every other trainer here.

- Network: ``monai.networks.nets.UNETR`` with MONAI's defaults (ViT-B/16 encoder: hidden
  size 768, 12 layers, 12 heads, MLP 3072, 16^3 patches; feature size 16, instance norm,
  residual blocks), ``img_size`` = the configuration's patch size, which must therefore be
  divisible by 16 along every axis; ``spatial_dims`` from the configuration, so the ``2d``
  configuration trains a 2D UNETR (16x16 patches) and 3d_fullres / 3d_lowres /
  3d_cascade_fullres the paper's 3D one.
- No deep supervision: UNETR has one output at full resolution, so the loss is nnU-Net's
  plain region / class loss without ``DeepSupervisionWrapper`` and the data loaders make no
  down-sampled targets (as nnU-Net's ``nnUNetTrainerNoDeepSupervision`` does).
- Optimiser: AdamW, learning rate 1e-4, weight decay 1e-5, as in the UNETR paper's
  implementation details and MONAI's UNETR reference training; nnU-Net's poly learning-rate
  decay over nnU-Net's 1000 epochs of 250 iterations.
- ``supports_deep_supervision = False`` makes the base trainer set
  ``enable_deep_supervision = False`` before nnU-Net builds the loss and the loaders.

MONAI is imported only when the network is built: nnU-Net imports every module of this
folder whenever it looks up a trainer, and MONAI takes seconds to import.
"""
from nnunet_mamba.training.base import MambaTrainerBase, short_variants

#: UNETR's ViT patch edge (``monai.networks.nets.UNETR`` uses 16^3 patches).
UNETR_PATCH = 16


def _unetr_class():
    try:
        from monai.networks.nets import UNETR
    except ImportError as e:
        raise ImportError(f"UNETRTrainer needs MONAI ({e}); fix: pip install 'monai>=1.3'") from None
    return UNETR


def check_patch_size(plans_manager, configuration_manager) -> tuple:
    """The configuration's patch size, or a ValueError naming the plans and the fix."""
    patch_size = tuple(int(p) for p in configuration_manager.patch_size)
    if any(p % UNETR_PATCH for p in patch_size):
        plans_file = f"$nnUNet_preprocessed/{plans_manager.dataset_name}/{plans_manager.plans_name}.json"
        suggestion = tuple(max(UNETR_PATCH, int(round(p / UNETR_PATCH)) * UNETR_PATCH) for p in patch_size)
        raise ValueError(
            f"UNETRTrainer: the patch size {list(patch_size)} of plans {plans_manager.plans_name!r} "
            f"(dataset {plans_manager.dataset_name}, configuration with data identifier "
            f"{configuration_manager.data_identifier!r}) is not divisible by {UNETR_PATCH} along every axis, "
            f"which UNETR's {UNETR_PATCH}^3 ViT patches need. Fix: set that configuration's \"patch_size\" in "
            f"{plans_file} to multiples of {UNETR_PATCH} (e.g. {list(suggestion)}, or the paper's "
            "[128, 128, 128]) -- best in a copy of the plans under a new plans name (nnUNetv2_train -p) -- "
            "and train again")
    return patch_size


class UNETRTrainer(MambaTrainerBase):
    """MONAI UNETR as an nnU-Net v2 trainer; AdamW lr 1e-4, wd 1e-5 as in the UNETR paper.

    Input (B, C_in, *patch_size) -> logits (B, C_out, *patch_size), one output (no deep
    supervision); ``patch_size`` comes from the plans and must be divisible by 16.
    """

    supports_deep_supervision = False
    optimizer_name = "adamw"
    hyperparameters = {"initial_lr": 1e-4, "weight_decay": 1e-5}

    @classmethod
    def build_network(cls, plans_manager, configuration_manager, num_input_channels: int,
                      num_output_channels: int, enable_deep_supervision: bool):
        patch_size = check_patch_size(plans_manager, configuration_manager)
        return _unetr_class()(in_channels=num_input_channels, out_channels=num_output_channels,
                              img_size=patch_size, spatial_dims=len(patch_size))

    def set_deep_supervision_enabled(self, enabled: bool):
        """UNETR has a single output: nothing to switch."""

    def _get_deep_supervision_scales(self):
        """No deep supervision, hence no down-sampled targets."""
        return None


globals().update(short_variants(UNETRTrainer, __name__))
