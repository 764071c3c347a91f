"""nnUNetTrainer_GPUAug: nnU-Net's own network and training, augmentation on the GPU.

Everything is ``nnUNetTrainer``'s (plans-based U-Net, SGD 1e-2 with poly decay, 1000 x 250
iterations, deep supervision, validation) except the training augmentation: nnU-Net's CPU
workers only load and crop, and the same transforms with the same probabilities and ranges
run batched on the GPU (:mod:`nnunet_mamba.training.gpu_augmentation_trainer`), as for our
Mamba trainers. It is the fair counterpart of ``nnUNetTrainer`` when the trainers are
compared with GPU augmentation, e.g. in ``scripts/bench_nnunet_gpu.sh``. On a CPU device
(or with ``NNUNET_MAMBA_GPU_AUGMENTATION=0``) it trains exactly like ``nnUNetTrainer``.
Short variants as for every trainer here: ``nnUNetTrainer_GPUAug_1epoch``, ``_2epochs``,
``_5epochs``, ``_smoke``, ...
"""
from typing import Any, ClassVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_mamba.training.base import short_variants
from nnunet_mamba.training.gpu_augmentation_trainer import GPUAugmentationMixin


class nnUNetTrainer_GPUAug(GPUAugmentationMixin, nnUNetTrainer):
    """nnUNetTrainer with its training augmentation batched on the GPU."""

    hyperparameters: ClassVar[dict[str, Any]] = {}
    """overrides of nnU-Net's instance attributes (the short variants set them)"""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        #: mirroring test-time augmentation in validation and prediction (nnU-Net: on)
        self.inference_mirroring = True
        for name, value in self.hyperparameters.items():
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__}: unknown hyperparameter {name!r}")
            setattr(self, name, value)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.inference_mirroring:
            self.inference_allowed_mirroring_axes = None
        return out


globals().update(short_variants(nnUNetTrainer_GPUAug, __name__))
if "nnUNetTrainer_GPUAug_2epochs" not in globals():  # the benchmark times the second epoch
    nnUNetTrainer_GPUAug_2epochs = type("nnUNetTrainer_GPUAug_2epochs", (nnUNetTrainer_GPUAug,), {
        "hyperparameters": {"num_epochs": 2}, "__module__": __name__,
        "__doc__": "nnUNetTrainer_GPUAug with {'num_epochs': 2}."})
