"""Subject-level cross-validated training of nnMambaCls / ResNet3D (nnMamba, Sec. 3.1, 3.3).

For each fold: train on the fold's training subjects, after every epoch evaluate the
validation subjects (taken from the training part, see :mod:`.splits`), keep the epoch with
the best validation AUC (ties: lower validation loss), choose the decision threshold on the
validation subjects (Youden's J, or a fixed value), and only then evaluate the test fold
once with that checkpoint and threshold. A subject's probability is the mean over its
rows (images). Results: per-fold and mean ± std AUC, ACC, SEN, SPE, PRE, F1.

Optimiser default: the paper's Sec. 3.1 setting, Adam, lr 2e-3, weight decay 1e-3,
batch 2, 100 epochs (the authors' public classifier used AdamW, lr 1e-4, wd 1e-3:
``--optimizer adamw --lr 1e-4``). Loss: cross-entropy over the class logits.
"""
from __future__ import annotations

import copy
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdm import tqdm

from ..errors import UserError
from ..networks import registry
from ..runkit import (ModelFolder, RunLog, make_optimizer, optimisation_step, resolve_device,
                      save_checkpoint, seed_everything)
from ..runkit.figures import plot_roc_curves, plot_training_curves
from ..safe_io import write_json
from .augmentation import ClassificationAugmentation
from .metrics import (METRIC_NAMES, binary_metrics, markdown_table, multiclass_metrics,
                      roc_auc, roc_curve, summarize, youden_threshold)
from .preprocessing import PreprocessingConfig, check_images, median_spacing, preprocess_table
from .splits import FoldSplit, make_folds
from .table import ClassificationTable

PLANS_FILE = "plans.json"
CHECKPOINT = "checkpoint_best.pth"
#: ``--optimizer`` and ``--lr-schedule`` choices
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


def model_folder(path) -> ModelFolder:
    """The layout of a classification model folder (``--out`` of ``nnmamba cls train``)."""
    return ModelFolder(path, PLANS_FILE, "nnmamba cls train")


@dataclass
class TrainSettings:
    """Training options (the CLI's ``nnmamba cls train`` flags)."""

    model: str = "nnmamba"
    base_channels: int = 32
    blocks_per_stage: int = 3
    epochs: int = 100
    batch_size: int = 2
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 1e-3
    lr_schedule: str = "constant"
    folds: int = 5
    val_fraction: float = 0.2
    threshold: str = "youden"  # "youden" or a number
    seed: int = 0
    augment: bool = True
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    num_workers: int = 0
    num_processes: int = 1  # preprocessing
    device: str = "auto"

    def model_kwargs(self) -> dict:
        return {"base_channels": self.base_channels, "blocks_per_stage": self.blocks_per_stage}

    def check(self) -> None:
        registry.check_name("classification", self.model)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule {self.lr_schedule!r}: choose from "
                            f"{', '.join(LR_SCHEDULES)}")
        if min(self.epochs, self.batch_size, self.base_channels, self.blocks_per_stage) < 1:
            raise UserError("--epochs, --batch-size, --base-channels and --blocks-per-stage must "
                            "be positive")
        if self.threshold != "youden":
            try:
                value = float(self.threshold)
            except ValueError:
                raise UserError(f"--threshold {self.threshold!r}: give 'youden' or a number "
                                "such as 0.5") from None
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--threshold {self.threshold}: a probability threshold lies in 0-1 "
                                "(e.g. 0.5), or give 'youden'")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise UserError(f"--mirror-axes {self.mirror_axes}: axes are 0, 1, 2 (z, y, x)")


def build_model(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    return registry.build("classification", name, in_channels, num_classes, **kwargs)


class VolumeDataset(torch.utils.data.Dataset):
    """Preprocessed (C, z, y, x) ``.npy`` files with their class indices."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int],
                 augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.files, self.labels, self.augment = list(files), list(labels), augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        x = torch.from_numpy(np.load(self.files[i]))
        if self.augment is not None:
            x = self.augment(x)
        return x.float(), self.labels[i]


def _progress(iterable, desc: str):
    """A tqdm bar over the epochs (the epoch lines then go to the log file only)."""
    return tqdm(iterable, desc=desc, unit="epoch", file=sys.stdout, dynamic_ncols=True)


@torch.no_grad()
def predict_probabilities(model: nn.Module, files: Sequence[Path], device: torch.device,
                          batch_size: int = 2) -> np.ndarray:
    """Softmax probabilities (N, K) of preprocessed files, model in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(files), batch_size):
        x = torch.stack([torch.from_numpy(np.load(f)) for f in files[i:i + batch_size]])
        out.append(torch.softmax(model(x.to(device).float()).float(), 1).cpu().numpy())
    return np.concatenate(out)


def mean_per_subject(values: np.ndarray, row_subjects: Sequence[str]):
    """Average rows of ``values`` per subject -> (subjects in first-seen order, (S, ...))."""
    subjects = list(dict.fromkeys(row_subjects))
    index = {s: i for i, s in enumerate(subjects)}
    sums = np.zeros((len(subjects),) + values.shape[1:])
    counts = np.zeros(len(subjects))
    for v, s in zip(values, row_subjects):
        sums[index[s]] += v
        counts[index[s]] += 1
    return subjects, sums / counts.reshape((-1,) + (1,) * (values.ndim - 1))


def evaluate(y: np.ndarray, prob: np.ndarray, threshold: Optional[float]) -> dict[str, float]:
    """Binary (threshold on the last class's probability) or multi-class (arg-max) metrics."""
    if prob.shape[1] == 2:
        return binary_metrics(y == 1, prob[:, 1], threshold)
    return multiclass_metrics(y, prob)


def selection_auc(y: np.ndarray, prob: np.ndarray) -> float:
    return roc_auc(y == 1, prob[:, 1]) if prob.shape[1] == 2 else multiclass_metrics(y, prob)["AUC"]


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    threshold: Optional[float]
    metrics: dict
    val_metrics: dict
    test_subjects: list = field(default_factory=list)
    test_labels: list = field(default_factory=list)
    test_probs: list = field(default_factory=list)
    history: list = field(default_factory=list)


def train_fold(split: FoldSplit, files: Sequence[Path], labels: Sequence[int],
               row_subjects: Sequence[str], num_classes: int, in_channels: int,
               settings: TrainSettings, size_zyx: Sequence[int], fold_dir: Path,
               log: RunLog, device: torch.device) -> FoldResult:
    """Train one fold; select checkpoint and threshold on its validation part; test once."""
    s = settings
    fold_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(s.seed * 1000 + split.fold)
    model_kwargs = s.model_kwargs()
    model = build_model(s.model, in_channels, num_classes, **model_kwargs).to(device)
    optimizer = make_optimizer(s.optimizer, model, s.lr, s.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs)
                 if s.lr_schedule == "cosine" else None)
    augment = (ClassificationAugmentation(size_zyx, mirror_axes=s.mirror_axes)
               if s.augment else None)
    pick = lambda idx, seq: [seq[i] for i in idx]  # noqa: E731
    train_set = VolumeDataset(pick(split.train, files), pick(split.train, labels), augment)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=s.batch_size, shuffle=True, num_workers=s.num_workers,
        drop_last=s.batch_size > 1 and len(train_set) % s.batch_size == 1,  # no batch of 1 (BN)
        pin_memory=device.type == "cuda", persistent_workers=s.num_workers > 0)
    val_files, val_rows = pick(split.val, files), pick(split.val, row_subjects)
    val_y_rows = np.array(pick(split.val, labels))
    _, val_y = mean_per_subject(val_y_rows.astype(float), val_rows)
    val_y = val_y.astype(int)

    history, best, best_key, best_state = [], None, None, None
    epochs = _progress(range(1, s.epochs + 1), f"fold {split.fold}")
    for epoch in epochs:
        model.train()
        t0, total, n = time.time(), 0.0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = optimisation_step(optimizer, F.cross_entropy(model(x), y),
                                     f"fold {split.fold}, epoch {epoch}", s.lr)
            total += loss * len(y)
            n += len(y)
        if scheduler is not None:
            scheduler.step()
        prob_rows = predict_probabilities(model, val_files, device, s.batch_size)
        val_loss = float(F.nll_loss(torch.log(torch.from_numpy(prob_rows).clamp_min(1e-12)),
                                    torch.from_numpy(val_y_rows)))
        _, prob = mean_per_subject(prob_rows, val_rows)
        auc = selection_auc(val_y, prob)
        entry = {"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss,
                 "val_auc": auc, "lr": optimizer.param_groups[0]["lr"],
                 "seconds": time.time() - t0}
        history.append(entry)
        key = (auc, -val_loss)
        if best_key is None or key > best_key:
            best_key, best = key, entry
            best_state = copy.deepcopy(model.state_dict())
        line = (f"fold {split.fold} epoch {epoch}/{s.epochs}: train loss {entry['train_loss']:.4f}"
                f", val loss {val_loss:.4f}, val AUC {auc:.4f}, best epoch {best['epoch']} "
                f"({entry['seconds']:.1f} s)")
        log(line, console=False)
        epochs.set_postfix(loss=f"{entry['train_loss']:.3f}", val_auc=f"{auc:.3f}",
                           best=best["epoch"])
    epochs.close()

    model.load_state_dict(best_state)
    _, val_prob = mean_per_subject(predict_probabilities(model, val_files, device, s.batch_size),
                                   val_rows)
    if num_classes == 2:
        threshold = (youden_threshold(val_y == 1, val_prob[:, 1]) if s.threshold == "youden"
                     else float(s.threshold))
    else:
        threshold = None  # arg-max decision
    val_metrics = evaluate(val_y, val_prob, threshold)
    # the test fold: evaluated once, with the checkpoint and threshold chosen above
    test_rows = pick(split.test, row_subjects)
    test_subjects, test_prob = mean_per_subject(
        predict_probabilities(model, pick(split.test, files), device, s.batch_size), test_rows)
    _, test_y = mean_per_subject(np.array(pick(split.test, labels), dtype=float), test_rows)
    test_y = test_y.astype(int)
    metrics = evaluate(test_y, test_prob, threshold)

    save_checkpoint(fold_dir / CHECKPOINT, model, model=s.model, model_kwargs=model_kwargs,
                    in_channels=in_channels, num_classes=num_classes, epoch=best["epoch"],
                    threshold=threshold)
    with open(fold_dir / "history.json", "w") as f:
        json.dump(history, f, indent=1)
    plot_training_curves(history, fold_dir / "curves.png", f"{s.model}, fold {split.fold}",
                         loss_label="cross-entropy", metric="val_auc", metric_label="AUC",
                         best_epoch=best["epoch"], metric_ylim=(0, 1.02))
    decision = "arg-max" if threshold is None else f"threshold {threshold:.4f}"
    log(f"fold {split.fold}: selected epoch {best['epoch']} (val AUC {best['val_auc']:.4f}), "
        f"{decision}; test " +
        ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
    return FoldResult(split.fold, best["epoch"], threshold, metrics, val_metrics,
                      test_subjects, test_y.tolist(), test_prob.tolist(), history)


def _write_json(path: Path, data) -> None:
    write_json(path, data, overwrite=True)  # temporary file + rename: never half-written


def cross_validate(table: ClassificationTable, config: PreprocessingConfig,
                   settings: TrainSettings, out_dir: str | Path, overwrite: bool = False,
                   id_column: str = "subject") -> dict:
    """The whole ``nnmamba cls train``: checks, preprocessing, folds, results. Returns the
    results dictionary also written to ``out_dir/results.json``.

    Everything that can be wrong with the input (CSV, images, class sizes) is checked
    before the first training step.
    """
    settings.check()
    if settings.threshold != "youden" and len(table.classes) != 2:
        raise UserError(f"--threshold {settings.threshold}: a decision threshold applies to two classes; "
                        f"with {len(table.classes)} classes the arg-max decides. Leave --threshold out")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is an existing file; pass a folder for the model")
    if model_folder(out_dir).config_path.exists() and not overwrite:
        raise UserError(f"{out_dir} already holds a trained model ({PLANS_FILE}); choose another "
                        "--out or pass --overwrite")
    device = resolve_device(settings.device)
    classes = table.classes
    row_subjects = [r.subject for r in table.rows]
    labels = table.label_indices()
    # 1. splits (class sizes) and image headers, before any heavy work
    splits = make_folds(row_subjects, table.subject_label_indices(), settings.folds,
                        settings.val_fraction, settings.seed, classes)
    spacings = check_images(table, config.orientation)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("results.json", "results.md", "roc.png", "oof_predictions.csv", "train.log"):
        (out_dir / stale).unlink(missing_ok=True)
    log = RunLog(out_dir / "train.log")
    if config.target_spacing is None:
        config.target_spacing = median_spacing(spacings)
        log(f"target spacing (median of the images, x y z mm): {config.target_spacing}")
    log(f"data: {table.describe()}; classes {list(classes)}"
        + (f" (positive class: {classes[-1]})" if len(classes) == 2 else ""))
    log(f"model {settings.model}, device {device}, settings {asdict(settings)}")
    # 2. preprocessing (reads every image: unreadable voxel data fails here, before training)
    t0 = time.time()
    files = preprocess_table(table, config, out_dir / "preprocessed", settings.num_processes)
    log(f"preprocessed {len(files)} rows to {tuple(config.size)} (x y z) in "
        f"{time.time() - t0:.1f} s; {config}")
    plans = {
        "format": 1, "model": settings.model, "model_kwargs": settings.model_kwargs(),
        "in_channels": table.num_channels, "num_classes": len(classes), "classes": list(classes),
        "positive_class": classes[-1] if len(classes) == 2 else None,
        "id_column": id_column, "image_columns": list(table.image_columns),
        "preprocessing": config.to_dict(), "settings": asdict(settings), "folds": [],
    }
    _write_json(out_dir / PLANS_FILE, plans)
    _write_json(out_dir / "splits.json", [
        {"fold": sp.fold, **{part: sorted({row_subjects[i] for i in getattr(sp, part)})
                             for part in ("train", "val", "test")}} for sp in splits])
    # 3. folds
    size_zyx = tuple(config.size)[::-1]
    results = []
    for split in splits:
        fold_dir = model_folder(out_dir).fold_dir(split.fold)
        log(f"fold {split.fold}: {len(split.train)} training, {len(split.val)} validation, "
            f"{len(split.test)} test rows")
        res = train_fold(split, files, labels, row_subjects, len(classes), table.num_channels,
                         settings, size_zyx, fold_dir, log, device)
        results.append(res)
        plans["folds"].append({"fold": res.fold,
                               "checkpoint": ModelFolder.checkpoint_name(res.fold, CHECKPOINT),
                               "threshold": res.threshold, "best_epoch": res.best_epoch})
        _write_json(out_dir / PLANS_FILE, plans)
    return _write_results(out_dir, results, classes, settings, log)


def _write_results(out_dir: Path, results: Sequence[FoldResult], classes, settings, log) -> dict:
    per_fold = [r.metrics for r in results]
    summary = summarize(per_fold)
    data = {
        "model": settings.model, "classes": list(classes),
        "positive_class": classes[-1] if len(classes) == 2 else None,
        "level": "subject", "metrics": list(METRIC_NAMES),
        "per_fold": [{"fold": r.fold, "best_epoch": r.best_epoch, "threshold": r.threshold,
                      "n_test_subjects": len(r.test_subjects), **r.metrics,
                      "validation": r.val_metrics} for r in results],
        "mean": {k: v["mean"] for k, v in summary.items()},
        "std": {k: v["std"] for k, v in summary.items()},
    }
    _write_json(out_dir / "results.json", data)
    title = f"{settings.model}: {len(results)}-fold cross-validation, test folds, per subject (%)"
    with open(out_dir / "results.md", "w") as f:
        f.write(markdown_table(per_fold, title))
    with open(out_dir / "oof_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "fold", "label"] + [f"prob_{c}" for c in classes])
        for r in results:
            for s, y, p in zip(r.test_subjects, r.test_labels, r.test_probs):
                w.writerow([s, r.fold, classes[y]] + [f"{v:.6f}" for v in p])
    if len(classes) == 2:
        curves = []
        for r in results:
            fpr, tpr, _ = roc_curve(np.array(r.test_labels) == 1, np.array(r.test_probs)[:, 1])
            curves.append((f"fold {r.fold} (AUC {r.metrics['AUC']:.3f})", fpr, tpr))
        plot_roc_curves(curves, out_dir / "roc.png",
                        f"{settings.model}: mean AUC {summary['AUC']['mean']:.3f} ± "
                        f"{summary['AUC']['std']:.3f}")
    log("cross-validation (test folds, per subject): " + ", ".join(
        f"{k} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}" for k, v in summary.items()))
    return data
