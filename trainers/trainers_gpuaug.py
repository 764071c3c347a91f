"""nnUNetTrainer_GPUAug: nnU-Net's own network and training, augmentation on the GPU.

Everything is ``nnUNetTrainer``'s (plans-based U-Net, SGD 1e-2 with poly decay, 1000 x 250
iterations, deep supervision, validation) except the training augmentation: nnU-Net's CPU
workers only load and crop, and the same transforms with the same probabilities and ranges
run batched on the GPU (:mod:`nnunet_mamba.training.gpu_augmentation_trainer`), as for our
Mamba trainers; and, as for them, the training step does not wait for the GPU (fused SGD,
losses read once per epoch: :mod:`nnunet_mamba.training.sync_free_step`). It is the fair counterpart of ``nnUNetTrainer`` when the trainers are
compared with GPU augmentation, e.g. in ``scripts/bench_nnunet_gpu.sh``. On a CPU device
(or with ``NNUNET_MAMBA_GPU_AUGMENTATION=0``) it trains exactly like ``nnUNetTrainer``.
Short variants as for every trainer here: ``nnUNetTrainer_GPUAug_1epoch``, ``_2epochs``,
``_5epochs``, ``_smoke``, ...
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_mamba.training.base import HyperparameterMixin, short_variants
from nnunet_mamba.training.gpu_augmentation_trainer import GPUAugmentationMixin
from nnunet_mamba.training.sync_free_step import SyncFreeStepMixin


class nnUNetTrainer_GPUAug(HyperparameterMixin, SyncFreeStepMixin, GPUAugmentationMixin, nnUNetTrainer):
    """nnUNetTrainer with its training augmentation batched on the GPU and nnU-Net's training
    step without host synchronisation (``hyperparameters``: set by the short variants)."""


globals().update(short_variants(nnUNetTrainer_GPUAug, __name__))
