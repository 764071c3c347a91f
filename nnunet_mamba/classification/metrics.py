"""Classification metrics of nnMamba's Table 2: AUC, ACC, SEN, SPE, PRE, F1.

Binary: scores are the positive-class probabilities; SEN (recall) = TP / (TP + FN),
SPE = TN / (TN + FP), PRE = TP / (TP + FP), F1 = 2 PRE SEN / (PRE + SEN), predictions are
``score >= threshold``. A ratio with a zero denominator is 0 (scikit-learn's
``zero_division=0``). AUC is the Mann-Whitney probability that a positive scores above a
negative (ties count one half), which is the area under the ROC curve.

More than two classes: one-vs-rest macro AUC, accuracy of the arg-max, and SEN, SPE, PRE, F1
averaged over the classes (macro).

The decision threshold is chosen on validation data (Youden's J = SEN + SPE - 1), and then
applied unchanged to the test fold.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

METRIC_NAMES = ("AUC", "ACC", "SEN", "SPE", "PRE", "F1")


def roc_curve(y_true, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting ``score >= thresholds[i]`` gives (fpr[i], tpr[i]).

    Thresholds are the distinct scores in decreasing order, preceded by +inf (nothing
    predicted positive).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=float)
    if y.all() or not y.any():
        raise ValueError("the ROC curve needs both classes in y_true")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def roc_auc(y_true, score) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count 1/2)."""
    from scipy.stats import rankdata
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        raise ValueError("AUC needs both classes in y_true")
    ranks = rankdata(np.asarray(score, dtype=float))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def youden_threshold(y_true, score) -> float:
    """Threshold maximising SEN + SPE - 1 on (validation) data.

    Returned as the midpoint between the best cut-off score and the next lower distinct
    score, so that it does not sit exactly on a validation case. Among equally good
    cut-offs the one closest to 0.5 is taken.
    """
    fpr, tpr, thr = roc_curve(y_true, score)
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    candidates = []
    for i in best:
        if i == 0:  # +inf: nothing positive; place it just above the highest score
            cut = float(thr[1]) + 1e-6
        else:
            lower = thr[i + 1] if i + 1 < len(thr) else min(0.0, float(thr[i]) - 1e-6)
            cut = float((thr[i] + lower) / 2)
        candidates.append(cut)
    return float(min(candidates, key=lambda c: abs(c - 0.5)))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def binary_metrics(y_true, score, threshold: float = 0.5) -> dict[str, float]:
    """AUC, ACC, SEN, SPE, PRE, F1 (fractions in [0, 1]) at ``score >= threshold``."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(score, dtype=float) >= threshold
    tp, tn = int(np.sum(pred & y)), int(np.sum(~pred & ~y))
    fp, fn = int(np.sum(pred & ~y)), int(np.sum(~pred & y))
    sen, pre = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {"AUC": roc_auc(y, score), "ACC": _ratio(tp + tn, len(y)), "SEN": sen,
            "SPE": _ratio(tn, tn + fp), "PRE": pre, "F1": _ratio(2 * pre * sen, pre + sen)}


def multiclass_metrics(y_true, prob) -> dict[str, float]:
    """Macro one-vs-rest AUC, arg-max accuracy and macro SEN, SPE, PRE, F1.

    ``prob``: (N, K) class probabilities; ``y_true``: (N,) class indices. Classes absent
    from ``y_true`` are left out of the macro averages.
    """
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    pred = p.argmax(1)
    per_class = []
    for k in range(p.shape[1]):
        pos = y == k
        if not pos.any() or pos.all():
            continue
        tp, fp = np.sum((pred == k) & pos), np.sum((pred == k) & ~pos)
        fn, tn = np.sum((pred != k) & pos), np.sum((pred != k) & ~pos)
        sen, pre = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
        per_class.append({"AUC": roc_auc(pos, p[:, k]), "SEN": sen,
                          "SPE": _ratio(tn, tn + fp), "PRE": pre,
                          "F1": _ratio(2 * pre * sen, pre + sen)})
    out = {name: float(np.mean([c[name] for c in per_class]))
           for name in ("AUC", "SEN", "SPE", "PRE", "F1")}
    out["ACC"] = float(np.mean(pred == y))
    return {name: out[name] for name in METRIC_NAMES}


def summarize(per_fold: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (population) standard deviation over folds of every metric."""
    return {name: {"mean": float(np.mean([f[name] for f in per_fold])),
                   "std": float(np.std([f[name] for f in per_fold]))}
            for name in METRIC_NAMES}


def markdown_table(per_fold: Sequence[dict[str, float]], title: str = "") -> str:
    """Per-fold rows and a mean ± std row, in percent (as in the paper's Table 2)."""
    summary = summarize(per_fold)
    lines = [f"### {title}", ""] if title else []
    lines.append("| Fold | " + " | ".join(METRIC_NAMES) + " |")
    lines.append("|---|" + "---|" * len(METRIC_NAMES))
    for i, f in enumerate(per_fold):
        lines.append(f"| {i} | " + " | ".join(f"{100 * f[n]:.2f}" for n in METRIC_NAMES) + " |")
    lines.append("| mean ± std | " + " | ".join(
        f"{100 * summary[n]['mean']:.2f} ± {100 * summary[n]['std']:.2f}"
        for n in METRIC_NAMES) + " |")
    return "\n".join(lines) + "\n"
