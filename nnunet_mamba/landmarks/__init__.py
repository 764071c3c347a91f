"""3D landmark detection with nnMamba (Gong et al. 2024, Sec. 2.2, 3.4): data layout and
geometry, heatmap targets and decoding, augmentation, cross-validated training,
prediction and MRE/SDR evaluation. The command line is ``nnmamba landmarks``
(:mod:`nnunet_mamba.landmarks.cli`); the networks live in
:mod:`nnunet_mamba.networks.nnmamba_landmark`.
"""
from .geometry import (WorkingGrid, array_to_index, index_to_array, index_to_world,
                       world_to_index)
from .heatmaps import decode_heatmaps, gaussian_heatmaps
from .io import discover_dataset, read_landmarks, write_landmarks
from .metrics import SDR_THRESHOLDS_MM, evaluate_folders, radial_errors, summarize_errors

__all__ = [
    "WorkingGrid", "world_to_index", "index_to_world", "index_to_array", "array_to_index",
    "gaussian_heatmaps", "decode_heatmaps", "read_landmarks", "write_landmarks",
    "discover_dataset", "radial_errors", "summarize_errors", "evaluate_folders",
    "SDR_THRESHOLDS_MM",
]
