"""nnU-Net trainer modules of nnunet-mamba (installed as ``nnunet_mamba_trainers``).

nnunetv2 imports every module of this folder by its bare name when it looks for a trainer
(``nnUNet_extTrainer``, set up by ``nnunet_mamba._register``). Module names therefore start
with ``trainers_`` so that they cannot shadow other top-level modules.
"""
