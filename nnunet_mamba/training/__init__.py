"""nnU-Net trainer machinery shared by all nnunet-mamba trainers."""
