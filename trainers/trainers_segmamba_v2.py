"""SegMambaV2Trainer: SegMamba-V2 (Xing et al., IEEE TMI 2025, github.com/ge-xing/SegMamba-V2) in
stock nnU-Net v2.

Optimiser, schedule and precision of the public code (``brats23/3_train.py`` and its
``light_training`` trainer): SGD, lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5,
polynomial decay, 1000 epochs of 250 iterations (there split over 4 GPUs), mixed precision on
CUDA - nnU-Net's own defaults, so only the network changes. The selective scan runs in
float32. The loss is nnU-Net's (Dice + CE, or Dice + BCE for region-based training such as
BraTS) where the public code uses plain cross-entropy. Patch and batch size come from the
plans (the public code: 128^3, batch 2 per GPU). SegMamba-V2 has no deep supervision, so the
trainer turns it off.
"""
from nnunet_mamba.networks.segmamba_v2 import SegMambaV2
from nnunet_mamba.training.base import MambaTrainerBase, short_variants


class SegMambaV2Trainer(MambaTrainerBase):
    """SegMamba-V2 (138.8 M parameters at 4 in / 3 out) with nnU-Net's SGD schedule, no deep supervision."""

    network_class = SegMambaV2
    supports_deep_supervision = False
    optimizer_name = "sgd"


globals().update(short_variants(SegMambaV2Trainer, __name__))
