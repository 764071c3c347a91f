"""nnMambaTrainer: nnMamba segmentation (Gong et al. 2024) inside stock nnU-Net v2.

Optimiser and schedule of the paper's Sec. 3.1: Adam, lr 2e-3, weight decay 1e-3, 100
epochs (of nnU-Net's 250 iterations), nnU-Net's poly learning-rate decay; batch size and
patch size from the plans (``nnmamba plans apply paper`` gives the paper's 128^3, batch 2).
Deep supervision through nnU-Net's own switch (``decoder.deep_supervision``) at full, 1/2,
1/4 and 1/8 resolution (anisotropic plans: 1 / cumprod of the plans' strides). Mixed
precision on CUDA as nnU-Net does it; the selective scan itself always runs in float32.

Every configuration (``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``): strides
and kernel sizes of nnMamba's four levels come from the plans (see ``nnMambaSeg.from_plans``).

Normalisation: the paper's BatchNorm (default), made sound for early validation (issue 13:
plain BatchNorm validated after two iterations gave inf logits): (1) before every validation
within the first 100 training iterations the trainer re-estimates the running statistics on
training batches with the current weights (``MambaTrainerBase.recalibrate_batchnorm``), so
validation, checkpoints and prediction use statistics of the saved weights; (2) eval-mode
statistics are bias-corrected for their initial values (``BiasCorrectedBatchNorm3d``). After
~100 iterations neither acts and the network is the paper's. ``nnMambaTrainer_InstanceNorm``
uses nnU-Net's InstanceNorm instead (no running statistics at all).
"""
from nnunet_mamba.networks import nnMambaSeg
from nnunet_mamba.training.base import MambaTrainerBase, short_variants


class nnMambaTrainer(MambaTrainerBase):
    """nnMambaSeg with the paper's optimiser settings (Adam 2e-3, wd 1e-3, 100 epochs)."""

    network_class = nnMambaSeg
    optimizer_name = "adam"
    hyperparameters = {"initial_lr": 2e-3, "weight_decay": 1e-3, "num_epochs": 100}


class nnMambaTrainer_InstanceNorm(nnMambaTrainer):
    """nnMambaTrainer with nnU-Net's InstanceNorm (affine, eps 1e-5) instead of BatchNorm."""

    network_kwargs = {"norm": "instance"}


globals().update(short_variants(nnMambaTrainer, __name__))
globals().update(short_variants(nnMambaTrainer_InstanceNorm, __name__))
