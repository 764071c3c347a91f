"""``nnmamba cls predict``: class probabilities per subject from the fold models of a run.

The images are preprocessed with the configuration stored in the model folder (the same
orientation, target spacing, size and normalisation as in training); every fold model
predicts every row, the softmax probabilities are averaged over the fold models
(ensemble) and then over the rows (images) of each subject. For two classes the predicted
class uses the mean of the fold thresholds (each chosen on its fold's validation subjects);
otherwise the arg-max.
"""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..runkit import resolve_device
from ..runkit.model_folder import check_folds
from ..safe_io import atomic_open, check_output_file
from .preprocessing import PreprocessingConfig, check_images, preprocess_table
from .table import read_table
from .trainer import PLANS_FILE, build_model, mean_per_subject, model_folder, \
    predict_probabilities


def load_plans(model_dir: Path) -> dict:
    folder = model_folder(model_dir)
    plans, path = folder.read_config(), folder.config_path
    if not isinstance(plans.get("folds", []), list):
        raise UserError(f"{path}: not a plans file of 'nnmamba cls train'; pass its --out folder")
    if not plans.get("folds"):
        raise UserError(f"{path}: no trained fold yet; let 'nnmamba cls train' finish a fold")
    return plans


def _check_columns(csv_path: Path, needed: Sequence[str], model_dir: Path) -> None:
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: CSV file not found; pass an existing file with --csv")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    missing = [c for c in needed if c not in header]
    if missing:
        raise UserError(f"{csv_path}: column(s) {missing} missing (columns: {header}); the model "
                        f"in {model_dir} was trained with id and image columns {list(needed)}: "
                        "name the columns of the new CSV the same way")


def load_fold_models(model_dir: Path, plans: dict, device: torch.device,
                     folds: Optional[Sequence[int]] = None):
    """[(fold entry, model in eval mode)] for the requested folds (default: all trained)."""
    trained = {e["fold"]: e for e in plans["folds"]}
    entries = [trained[k] for k in check_folds(folds, list(trained), model_dir)]
    models = model_folder(model_dir).load_ensemble(
        {e["fold"]: e["checkpoint"] for e in entries},
        lambda ckpt: build_model(ckpt["model"], ckpt["in_channels"], ckpt["num_classes"],
                                 **ckpt["model_kwargs"]), device)
    return list(zip(entries, models))


def predict_csv(model_dir: str | Path, csv_path: str | Path, out_csv: str | Path,
                device: str = "auto", folds: Optional[Sequence[int]] = None,
                num_processes: int = 1, batch_size: int = 2, overwrite: bool = False) -> Path:
    """Write ``out_csv`` with columns subject, n_images, prob_<class>..., predicted_class.

    ``out_csv`` is checked before any work (no existing file without ``overwrite``, never
    the input CSV or a file of the model folder) and written through a temporary file."""
    model_dir = Path(model_dir)
    check_output_file(out_csv, overwrite, inputs=[csv_path, model_dir / PLANS_FILE])
    if os.path.commonpath([os.path.realpath(model_dir), os.path.realpath(out_csv)]) == \
            os.path.realpath(model_dir):
        raise UserError(f"--out {out_csv} lies in the model folder {model_dir}; write predictions elsewhere")
    plans = load_plans(model_dir)
    _check_columns(Path(csv_path), [plans["id_column"], *plans["image_columns"]], model_dir)
    table = read_table(csv_path, id_column=plans["id_column"],
                       image_columns=plans["image_columns"], require_labels=False)
    config = PreprocessingConfig.from_dict(plans["preprocessing"])
    check_images(table, config.orientation)
    dev = resolve_device(device)
    models = load_fold_models(model_dir, plans, dev, folds)
    classes = plans["classes"]
    with tempfile.TemporaryDirectory(prefix="nnmamba_cls_") as tmp:
        files = preprocess_table(table, config, Path(tmp), num_processes)
        probs = np.mean([predict_probabilities(m, files, dev, batch_size) for _, m in models],
                        axis=0)
    row_subjects = [r.subject for r in table.rows]
    subjects, subject_probs = mean_per_subject(probs, row_subjects)
    n_images = {s: row_subjects.count(s) for s in subjects}
    if len(classes) == 2:
        threshold = float(np.mean([e["threshold"] for e, _ in models]))
        predicted = [classes[int(p[1] >= threshold)] for p in subject_probs]
    else:
        threshold = None
        predicted = [classes[int(np.argmax(p))] for p in subject_probs]
    out_csv = Path(out_csv)
    with atomic_open(out_csv, "w", overwrite=overwrite, newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "n_images"] + [f"prob_{c}" for c in classes] + ["predicted_class"])
        for s, p, c in zip(subjects, subject_probs, predicted):
            w.writerow([s, n_images[s]] + [f"{v:.6f}" for v in p] + [c])
    decision = ("arg-max" if threshold is None
                else f"threshold {threshold:.4f} on prob_{classes[-1]}")
    print(f"{len(subjects)} subjects, ensemble of {len(models)} fold model(s), {decision}: "
          f"{out_csv}")
    return out_csv
