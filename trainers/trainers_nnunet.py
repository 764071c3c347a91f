"""Short variants of nnU-Net's own ``nnUNetTrainer`` that nnunetv2 2.8 does not ship.

``nnUNetTrainer_2epochs``: nnU-Net's trainer, everything at its defaults (network, augmentation,
``torch.compile`` unless ``nnUNet_compile`` says otherwise) for two epochs, in the style of
nnunetv2's ``nnUNetTrainer_1epoch``. ``scripts/bench_nnunet_gpu.sh`` times its SECOND epoch
(compilation amortised) against our trainers' ``_2epochs`` variants.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_2epochs(nnUNetTrainer):
    """nnUNetTrainer for 2 epochs."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
