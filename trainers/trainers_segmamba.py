"""SegMambaTrainer: SegMamba (Xing et al. 2024, github.com/ge-xing/SegMamba) in stock nnU-Net v2.

Optimiser, schedule and precision of the public code (``3_train.py``): SGD, lr 1e-2, Nesterov
momentum 0.99, weight decay 3e-5, polynomial decay, 1000 epochs (nnU-Net's 250 iterations
each), mixed precision on CUDA - nnU-Net's own defaults, so only the network changes. The
selective scan itself runs in float32. The loss is nnU-Net's (Dice + CE, or Dice + BCE for
region-based training such as BraTS) where the public code uses plain cross-entropy.
Patch and batch size come from the plans (the paper: 128^3, batch 2). SegMamba has no deep
supervision, so the trainer turns it off (nnU-Net then builds the loss and the data
transforms without it).
"""
from nnunet_mamba.networks.segmamba import SegMamba
from nnunet_mamba.training.base import MambaTrainerBase, short_variants


class SegMambaTrainer(MambaTrainerBase):
    """SegMamba (67.4 M parameters at 4 in / 4 out) with nnU-Net's SGD schedule, no deep supervision."""

    network_class = SegMamba
    supports_deep_supervision = False
    optimizer_name = "sgd"


globals().update(short_variants(SegMambaTrainer, __name__))
