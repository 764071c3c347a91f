"""Networks of nnunet-mamba, composed from :mod:`nnunet_mamba.networks.blocks`."""
from .nnmamba_seg import ResMambaEncoder, SkipScaledDecoder, nnMambaSeg

__all__ = ["nnMambaSeg", "ResMambaEncoder", "SkipScaledDecoder"]
