"""U-Mamba trainers (Ma et al. 2024, github.com/bowang-lab/U-Mamba) in stock nnU-Net v2.

``UMambaBotTrainer`` and ``UMambaEncTrainer`` build U-Mamba Bot / Enc from the plans' U-Net
configuration, 2D or 3D (stages, widths, kernels, strides, block counts, patch size). Optimiser,
schedule and precision are those of the public code, which are nnU-Net's defaults: SGD, lr
1e-2, Nesterov momentum 0.99, weight decay 3e-5, polynomial decay, 1000 epochs x 250
iterations, deep supervision, mixed precision on CUDA. The Mamba layers run in float32 with
autocast off, as in the public code (whose README warns that AMP can produce NaN there).
"""
from nnunet_mamba.networks.umamba import UMambaBot, UMambaEnc
from nnunet_mamba.training.base import MambaTrainerBase, short_variants


class UMambaBotTrainer(MambaTrainerBase):
    """U-Mamba Bot (one Mamba layer at the bottleneck) with nnU-Net's default training."""

    network_class = UMambaBot


class UMambaEncTrainer(UMambaBotTrainer):
    """U-Mamba Enc (a Mamba layer after every encoder stage) with nnU-Net's default training."""

    network_class = UMambaEnc


globals().update(short_variants(UMambaBotTrainer, __name__))
globals().update(short_variants(UMambaEncTrainer, __name__))
