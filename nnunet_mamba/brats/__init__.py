"""BraTS 2023 glioma (GLI) tooling for the nnMamba paper's segmentation benchmark (Sec. 3.2, Table 1).

- :mod:`.layout`: the BraTS 2023 file layout, label and region definitions, the nnU-Net channel order.
- :mod:`.synth`: a synthetic data set in that exact layout (tests, demos, dry runs).
- :mod:`.convert`: BraTS layout -> nnU-Net v2 raw dataset with the paper's 70/10/20 split.
- :mod:`.metrics`: per-case, per-region Dice and HD95 under a chosen empty-mask convention.
- :mod:`.reproduce`: ``nnmamba brats2023 reproduce``, the paper's Table 1 in one command: its options
  and protocol; the steps in :mod:`.steps`, the rows in :mod:`.baselines`, the submitit executors in
  :mod:`.jobs`, the table in :mod:`.table1`, ``reproduce.json``'s record in :mod:`.provenance`.
- :mod:`.cli`: the ``nnmamba brats2023`` command.

Nothing heavy is imported here: ``torch`` and MONAI are loaded only by :mod:`.metrics`.
"""
from .layout import (  # noqa: F401
    CHANNEL_ORDER,
    FILE_ENDING,
    LABELS,
    MODALITIES,
    REGIONS,
    REGIONS_CLASS_ORDER,
    case_file_name,
    is_case_id,
)
