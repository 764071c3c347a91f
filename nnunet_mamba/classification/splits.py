"""Subject-level stratified cross-validation with a validation subset inside each fold.

Splitting is done on the unique subjects (each has one label), with scikit-learn's
``StratifiedKFold``; rows follow their subject, so all images of a subject are in one part
(the same guarantee as ``StratifiedGroupKFold``, but stratified by subjects, not rows).
Within each fold's training part, a second subject-level ``StratifiedKFold`` with
``round(1 / val_fraction)`` splits gives the validation subjects (one of its test parts);
they are used for model selection and the decision threshold only, never for training.
The test fold is never looked at before the final evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class FoldSplit:
    """Row indices of the three parts of one fold."""

    fold: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


def inner_splits(val_fraction: float) -> int:
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be between 0 and 1 (e.g. 0.2)")
    return max(2, int(round(1.0 / val_fraction)))


def min_subjects_per_class(n_folds: int, val_fraction: float) -> int:
    """Smallest class size for which every test fold and every validation subset can hold
    at least one subject of the class."""
    n_inner = inner_splits(val_fraction)
    c = n_folds
    while c - math.ceil(c / n_folds) < n_inner:
        c += 1
    return c


def make_folds(row_subjects: Sequence[str], subject_labels: dict[str, int], n_folds: int = 5,
               val_fraction: float = 0.2, seed: int = 0,
               class_names: Sequence[str] | None = None) -> list[FoldSplit]:
    """Split rows into ``n_folds`` (train, val, test) parts at the subject level.

    ``row_subjects[i]`` is the subject of row i; ``subject_labels`` maps each subject to its
    class index. Raises a UserError when a class has too few subjects for the splits.
    """
    from sklearn.model_selection import StratifiedKFold

    if n_folds < 2:
        raise UserError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    n_inner = inner_splits(val_fraction)
    subjects = list(dict.fromkeys(row_subjects))
    labels = np.array([subject_labels[s] for s in subjects])
    names = list(class_names) if class_names else [str(i) for i in range(labels.max() + 1)]
    counts = np.bincount(labels, minlength=len(names))
    need = min_subjects_per_class(n_folds, val_fraction)
    for k, n in enumerate(counts):
        if n < need:
            raise UserError(
                f"class {names[k]!r} has {n} subject(s); {n_folds}-fold cross-validation with a "
                f"validation subset of 1/{n_inner} of each training part needs at least {need} "
                f"subjects per class. Add subjects, lower --folds, or raise --val-fraction")
    rows_of: dict[str, list[int]] = {}
    for i, s in enumerate(row_subjects):
        rows_of.setdefault(s, []).append(i)

    def rows(subject_idx) -> tuple[int, ...]:
        return tuple(sorted(i for j in subject_idx for i in rows_of[subjects[j]]))

    outer = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for fold, (train_val, test) in enumerate(outer.split(np.zeros(len(subjects)), labels)):
        inner = StratifiedKFold(n_splits=n_inner, shuffle=True, random_state=seed + 1 + fold)
        fit, val = next(inner.split(np.zeros(len(train_val)), labels[train_val]))
        folds.append(FoldSplit(fold, rows(train_val[fit]), rows(train_val[val]), rows(test)))
    return folds
