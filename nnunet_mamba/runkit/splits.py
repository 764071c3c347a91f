"""The seeded k-fold split of a case list (landmark cross-validation, BraTS's
``splits_final.json``).

The sorted case names are permuted with ``seed`` and cut into ``n_folds`` parts by
``numpy.array_split`` (the first ``n % n_folds`` parts one case larger); part k is fold k's
validation set, the other cases its training set. ``generator`` picks the permutation:
'pcg64' (``numpy.random.default_rng``, the landmark pipeline) or 'mt19937'
(``numpy.random.RandomState``, BraTS; a stream NumPy keeps stable across versions). Each
keeps the fold assignment its pipeline always had, so existing model folders and
``splits_final.json`` files stay valid.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import UserError


def kfold_split(case_ids: Iterable[str], n_folds: int, seed: int,
                generator: str = "pcg64") -> list[dict]:
    """``[{"train": [...], "val": [...]}]`` per fold, each list sorted; the validation sets
    partition the cases. The result depends on the set of names, not their order."""
    ids = sorted(case_ids)
    if n_folds < 2:
        raise UserError(f"{n_folds} fold(s): cross-validation needs at least 2 folds")
    if len(ids) < n_folds:
        raise UserError(f"{len(ids)} case(s) are too few for {n_folds}-fold cross-validation: they "
                        f"cannot be split into {n_folds} folds; use fewer folds or add cases")
    if generator == "pcg64":
        order = np.random.default_rng(seed).permutation(len(ids))
    elif generator == "mt19937":
        order = np.random.RandomState(seed).permutation(len(ids))
    else:
        raise ValueError(f"generator {generator!r}: 'pcg64' or 'mt19937'")
    folds = []
    for chunk in np.array_split(order, n_folds):
        val = sorted(ids[i] for i in chunk)
        held = set(val)
        folds.append({"train": [c for c in ids if c not in held], "val": val})
    return folds
