"""PNG figures of a classification run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_training_curves(history: Sequence[dict], path: Path, best_epoch: int | None = None,
                         title: str = "") -> None:
    """Training / validation loss (left axis) and validation AUC (right axis) per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss", color="tab:blue")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation loss", color="tab:orange")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_auc"] for h in history], label="validation AUC", color="tab:green")
    ax2.set_ylabel("AUC")
    ax2.set_ylim(0, 1.02)
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"selected epoch {best_epoch}")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc_curves(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: Path,
                    title: str = "") -> None:
    """ROC curves: one (label, fpr, tpr) per curve, with the chance diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
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
    plt.close(fig)
