"""The networks of the hand-written pipelines, by the ``--model`` name their CLIs take.

``nnmamba cls train --model`` chooses from :data:`CLASSIFICATION_NETWORKS`, ``nnmamba
landmarks train --model`` from :data:`LANDMARK_NETWORKS`; :func:`build` makes the network
a model folder describes (its task, name and keyword arguments). Segmentation networks are
chosen by trainer instead (``trainers/``), as nnU-Net does.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from .nnmamba_cls import ResNet3D, nnMambaCls
from .nnmamba_landmark import ResUNetLandmark, nnMambaLandmark

#: ``nnmamba cls train --model`` -> network class (in_channels, num_classes, **kwargs)
CLASSIFICATION_NETWORKS = {"nnmamba": nnMambaCls, "resnet": ResNet3D}
#: ``nnmamba landmarks train --model`` -> network class (in_channels, num_landmarks, **kwargs)
LANDMARK_NETWORKS = {"nnmamba": nnMambaLandmark, "resunet": ResUNetLandmark}

NETWORKS = {"classification": CLASSIFICATION_NETWORKS, "landmarks": LANDMARK_NETWORKS}


def check_name(task: str, name: str) -> None:
    """UserError unless ``name`` is a network of ``task`` ('classification', 'landmarks')."""
    if name not in NETWORKS[task]:
        raise UserError(f"--model {name!r}: choose from {', '.join(NETWORKS[task])}")


def build(task: str, name: str, in_channels: int, out_channels: int, **kwargs) -> nn.Module:
    """The ``task`` network called ``name`` with fresh weights: ``out_channels`` classes
    (classification) or heatmaps (landmarks)."""
    check_name(task, name)
    return NETWORKS[task][name](in_channels, out_channels, **kwargs)
