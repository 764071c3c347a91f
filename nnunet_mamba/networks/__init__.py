"""Networks of nnunet-mamba, composed from :mod:`nnunet_mamba.networks.blocks` and the
shared Mamba layer :mod:`nnunet_mamba.ssm`."""
from .nnmamba_cls import ResNet3D, nnMambaCls
from .nnmamba_landmark import ResUNetLandmark, nnMambaLandmark
from .nnmamba_backbone import ResMambaEncoder, SkipScaledDecoder
from .nnmamba_seg import nnMambaSeg
from .segmamba import SegMamba
from .taming import BiSegMamba, MultiSegMamba, SegMambaSkip, TamingSegMamba
from .umamba import UMambaBot, UMambaEnc

__all__ = [
    "nnMambaSeg", "ResMambaEncoder", "SkipScaledDecoder", "nnMambaCls", "ResNet3D",
    "nnMambaLandmark", "ResUNetLandmark", "SegMamba", "TamingSegMamba", "BiSegMamba",
    "MultiSegMamba", "SegMambaSkip", "UMambaBot", "UMambaEnc",
]
