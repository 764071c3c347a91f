"""The BraTS 2023 GLI data layout, labels, regions and the nnU-Net channel order.

A BraTS 2023 case is a folder ``BraTS-GLI-XXXXX-XXX/`` holding five NIfTI files on one
240 x 240 x 155 grid at 1 mm: ``<case>-t1c.nii.gz`` (T1 post-contrast), ``<case>-t1n.nii.gz``
(native T1), ``<case>-t2f.nii.gz`` (T2-FLAIR), ``<case>-t2w.nii.gz`` (T2) and
``<case>-seg.nii.gz`` (labels 0 background, 1 necrotic tumour core, 2 peritumoral oedema,
3 enhancing tumour). The evaluated regions are nested: whole tumour WT = {1, 2, 3},
tumour core TC = {1, 3}, enhancing tumour ET = {3}.
"""
from __future__ import annotations

import re

FILE_ENDING = ".nii.gz"

#: BraTS 2023 modality suffixes with what they are.
MODALITIES = {
    "t1n": "native T1-weighted",
    "t1c": "T1-weighted post-contrast (gadolinium)",
    "t2w": "T2-weighted",
    "t2f": "T2-FLAIR",
}

#: Suffix of the label file.
SEG = "seg"

#: nnU-Net input channel i (file ``<case>_000i.nii.gz``) holds modality CHANNEL_ORDER[i].
#: The order t1n, t1c, t2w, t2f is the one of nnU-Net's own BraTS conversions (T1, T1ce, T2, FLAIR).
CHANNEL_ORDER = ("t1n", "t1c", "t2w", "t2f")

#: Native BraTS 2023 labels.
LABELS = {
    0: "background",
    1: "necrotic tumour core (NCR)",
    2: "peritumoral oedema (ED)",
    3: "enhancing tumour (ET)",
}

#: Evaluated regions, in the order of nnU-Net's region heads (enclosing region first).
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

#: nnU-Net paints region i of REGIONS with label REGIONS_CLASS_ORDER[i] (WT -> 2, TC -> 1,
#: ET -> 3), which gives back the native BraTS labels.
REGIONS_CLASS_ORDER = (2, 1, 3)

#: nnU-Net dataset.json ``labels`` entry for region-based training on the regions above.
NNUNET_REGION_LABELS = {
    "background": 0,
    "whole tumor": [1, 2, 3],
    "tumor core": [1, 3],
    "enhancing tumor": [3],
}

_CASE_ID = re.compile(r"^BraTS-[A-Z]+-\d{5}-\d{3}$")


def is_case_id(name: str) -> bool:
    """True for BraTS 2023 case names such as ``BraTS-GLI-00000-000``."""
    return bool(_CASE_ID.match(name))


def case_file_name(case_id: str, suffix: str) -> str:
    """``case_file_name("BraTS-GLI-00000-000", "t1c") == "BraTS-GLI-00000-000-t1c.nii.gz"``."""
    return f"{case_id}-{suffix}{FILE_ENDING}"


def expected_files(case_id: str) -> dict[str, str]:
    """The five file names of a case, keyed by suffix (modalities first, then ``seg``)."""
    return {s: case_file_name(case_id, s) for s in (*MODALITIES, SEG)}

