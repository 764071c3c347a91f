"""nnMambaTrainer: nnMamba segmentation (Gong et al. 2024) inside stock nnU-Net v2.

Optimiser and schedule of the paper's Sec. 3.1: Adam, lr 2e-3, weight decay 1e-3, 100
epochs (of nnU-Net's 250 iterations), nnU-Net's poly learning-rate decay; batch size and
patch size from the plans (``nnmamba plans apply paper`` gives the paper's 128^3, batch 2).
Deep supervision through nnU-Net's own switch (``decoder.deep_supervision``) at full, 1/2,
1/4 and 1/8 resolution. Mixed precision on CUDA as nnU-Net does it; the selective scan
itself always runs in float32.
"""
from nnunet_mamba.networks import nnMambaSeg
from nnunet_mamba.training.base import MambaTrainerBase, short_variants


class nnMambaTrainer(MambaTrainerBase):
    """nnMambaSeg with the paper's optimiser settings (Adam 2e-3, wd 1e-3, 100 epochs)."""

    network_class = nnMambaSeg
    optimizer_name = "adam"
    hyperparameters = {"initial_lr": 2e-3, "weight_decay": 1e-3, "num_epochs": 100}


globals().update(short_variants(nnMambaTrainer, __name__))
