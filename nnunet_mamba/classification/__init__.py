"""3D image classification with nnMamba (Gong et al. 2024, Sec. 2.3, 3.3, Table 2).

``nnmamba cls train`` / ``predict`` (:mod:`.cli`) run a CSV-described data set through
preprocessing (:mod:`.preprocessing`), subject-level stratified cross-validation
(:mod:`.splits`, :mod:`.trainer`) and the paper's metrics (:mod:`.metrics`).
The networks are :class:`nnunet_mamba.networks.nnmamba_cls.nnMambaCls` and
:class:`~nnunet_mamba.networks.nnmamba_cls.ResNet3D`.
"""
from .metrics import (METRIC_NAMES, binary_metrics, multiclass_metrics, roc_auc, roc_curve,
                      summarize, youden_threshold)
from .preprocessing import PreprocessingConfig, preprocess_case
from .splits import FoldSplit, make_folds
from .table import CaseRow, ClassificationTable, read_table

__all__ = [
    "METRIC_NAMES", "binary_metrics", "multiclass_metrics", "roc_auc", "roc_curve", "summarize",
    "youden_threshold", "PreprocessingConfig", "preprocess_case", "FoldSplit", "make_folds",
    "CaseRow", "ClassificationTable", "read_table",
]
