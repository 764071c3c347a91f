"""nnunet-mamba: Mamba networks for 3D biomedical images as nnU-Net v2 trainers."""
__version__ = "0.1.0"
