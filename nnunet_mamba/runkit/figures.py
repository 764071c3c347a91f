"""PNG figures of the training pipelines, drawn on a :class:`matplotlib.figure.Figure` with
its own Agg canvas: no display needed, and matplotlib's global backend and pyplot state
are left alone.

One style for training curves (:func:`plot_training_curves`): the losses on the left, the
validation metric on the right, the selected epoch as a dashed line in both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _points(history: Sequence[dict], key: str) -> list[tuple]:
    return [(h["epoch"], h[key]) for h in history if h.get(key) is not None]


def plot_training_curves(history: Sequence[dict], path: Path, title: str, *, loss_label: str,
                         metric: str, metric_label: str, best_epoch: Optional[int] = None,
                         log_loss: bool = False, metric_ylim: Optional[tuple] = None) -> None:
    """Training and validation loss (``train_loss``, ``val_loss``) and the validation
    ``metric`` per epoch of ``history`` (entries without a value are skipped)."""
    fig = _figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(*zip(*_points(history, "train_loss")), label="train loss")
    val = _points(history, "val_loss")
    if val:
        ax1.plot(*zip(*val), label="validation loss")
    if log_loss:
        ax1.set_yscale("log")
    ax1.set_ylabel(loss_label)
    scores = _points(history, metric)
    if scores:
        ax2.plot(*zip(*scores), "o-", ms=3, color="tab:green", label=f"validation {metric_label}")
        ax2.set_ylabel(metric_label)
        if metric_ylim is not None:
            ax2.set_ylim(*metric_ylim)
    else:
        ax2.text(0.5, 0.5, "no validation cases", ha="center", va="center",
                 transform=ax2.transAxes)
    for ax in (ax1, ax2):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"selected epoch {best_epoch}")
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_roc_curves(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: Path,
                    title: str = "") -> None:
    """ROC curves: one (label, fpr, tpr) per curve, with the chance diagonal."""
    fig = _figure(5, 5)
    ax = fig.subplots()
    for label, fpr, tpr in curves:
        ax.plot(fpr, tpr, lw=1.5, label=label)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("1 - specificity (FPR)")
    ax.set_ylabel("sensitivity (TPR)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
