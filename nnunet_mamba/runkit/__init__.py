"""What the hand-written training pipelines (:mod:`nnunet_mamba.classification`,
:mod:`nnunet_mamba.landmarks`) share; nnU-Net does all of this itself for the segmentation
trainers.

* :mod:`.run`: device choice, seeding, the run log, the optimisation step (a non-finite loss
  is a :class:`~nnunet_mamba.errors.UserError`);
* :mod:`.optim`: optimiser parameter groups (no weight decay on Mamba's ``A_log`` and ``D``);
* :mod:`.splits`: the seeded k-fold split of a case list (also BraTS's ``splits_final.json``);
* :mod:`.figures`: training curves and ROC curves as PNG files (no global matplotlib state);
* :mod:`.model_folder`: a trained model folder: config file, ``fold_<k>/`` checkpoints
  (saved as plain data, loaded with ``weights_only=True``, paths confined to the folder),
  fold ensembles.
"""
from .model_folder import ModelFolder, save_checkpoint
from .optim import make_optimizer, parameter_groups
from .run import RunLog, optimisation_step, resolve_device, seed_everything
from .splits import kfold_split

__all__ = ["ModelFolder", "save_checkpoint", "make_optimizer", "parameter_groups", "RunLog",
           "optimisation_step", "resolve_device", "seed_everything", "kfold_split"]
