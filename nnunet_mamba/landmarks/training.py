"""Heatmap-regression training with k-fold cross-validation (Gong et al. 2024, Sec. 3.4).

Recipe (defaults; every item is an option of ``nnmamba landmarks train``):

* volumes resampled to 128^3 (:class:`~.geometry.WorkingGrid`), z-scored;
* one Gaussian heatmap per landmark, sigma 5 working-grid voxels, peak 1;
* MSE loss between the network output and the heatmaps;
* Adam, lr 1e-3, no weight decay, constant learning rate, 80 epochs, batch 2: the
  settings of the authors' landmark release (lhaof/LFC) in our field notes. Sec. 3.1 of the
  paper gives Adam lr 2e-3, weight decay 1e-3, 100 epochs for its experiments in general;
  use ``--lr 2e-3 --weight-decay 1e-3 --epochs 100`` for that;
* an epoch is one pass over the training cases; augmentation (:mod:`.augment`) moves the
  landmarks with the image;
* 5-fold cross-validation over the cases (seeded shuffle); per fold the validation MRE in
  mm is computed every ``val_every`` epochs; ``checkpoint_final.pt`` (last epoch) and
  ``checkpoint_best.pt`` (lowest validation MRE) are saved, and the final model's
  validation predictions feed the cross-validation summary.

Output folder::

    OUT/config.json, OUT/splits.json, OUT/working_grids.json, OUT/train_log.txt
    OUT/fold_<k>/{checkpoint_final.pt, checkpoint_best.pt, training_config.json, log.txt,
                  progress.json, progress.png, validation/<CASE>.json,
                  validation_metrics/{summary.json, summary.md, per_case.csv}}
    OUT/cv_evaluation/{summary.json, summary.md, per_case.csv}   (once all folds are done)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..networks import registry
from ..runkit import (RunLog, kfold_split, make_optimizer, optimisation_step, save_checkpoint,
                      seed_everything)
from ..runkit.figures import plot_training_curves
from ..safe_io import load_json
from .augment import AugmentationConfig, LandmarkAugmenter
from .data import PreparedCase, load_training_cases
from .heatmaps import gaussian_heatmaps
from .inference import CHECKPOINTS, build_network, decode_to_world, model_folder, predict_heatmaps
from .io import write_landmarks
from .metrics import format_overall, radial_errors, summarize_errors, write_evaluation

#: config keys that must agree when more folds are trained into an existing folder
_FIXED_KEYS = ("model", "model_kwargs", "size", "sigma", "antialias", "landmarks", "folds",
               "seed")


@dataclass
class TrainingConfig:
    """Everything that defines a training run (saved as ``config.json``)."""

    model: str = "nnmamba"
    base_channels: int = 32
    blocks_per_stage: int = 3
    size: tuple[int, int, int] = (128, 128, 128)
    sigma: float = 5.0
    epochs: int = 80
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    folds: int = 5
    seed: int = 0
    antialias: bool = True
    iterations_per_epoch: Optional[int] = None
    val_every: int = 1
    decode_radius: int = 3
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def model_kwargs(self) -> dict:
        return {"base_channels": self.base_channels, "blocks_per_stage": self.blocks_per_stage}

    def check(self) -> None:
        """UserError for options out of range (the CLI's and the API's only check)."""
        registry.check_name("landmarks", self.model)
        if any(s < 16 for s in self.size):
            raise UserError(f"--size {' '.join(map(str, self.size))}: each side needs >= 16 voxels.")
        if not (self.sigma > 0 and self.lr > 0):
            raise UserError("--sigma and --lr must be positive.")
        counts = {"--epochs": self.epochs, "--batch-size": self.batch_size, "--folds": self.folds,
                  "--val-every": self.val_every, "--base-channels": self.base_channels,
                  "--blocks-per-stage": self.blocks_per_stage,
                  "--iterations-per-epoch": self.iterations_per_epoch or 1}
        bad = [name for name, v in counts.items() if v < 1]
        if bad:
            raise UserError(f"{', '.join(bad)} must be at least 1.")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay {self.weight_decay}: must be >= 0.")

    def to_dict(self, landmarks: Sequence[str]) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["augmentation"] = self.augmentation.to_dict()
        d["model_kwargs"] = self.model_kwargs()
        d["landmarks"] = list(landmarks)
        d["optimizer"] = {"name": "Adam", "lr": self.lr, "weight_decay": self.weight_decay,
                          "schedule": "constant"}
        d["loss"] = "MSE(heatmaps, Gaussian targets)"
        d["normalisation"] = "z-score per volume on the working grid"
        return d


def make_splits(case_ids: Sequence[str], folds: int, seed: int) -> list[dict]:
    """k-fold splits [{"train": [...], "val": [...]}] of a seeded shuffle
    (:func:`~nnunet_mamba.runkit.splits.kfold_split`); folds=1: all cases train."""
    if folds == 1:
        return [{"train": sorted(case_ids), "val": []}]
    return kfold_split(case_ids, folds, seed)


def plot_progress(history: list[dict], path: Path, title: str) -> None:
    """Loss curves (train, validation) and validation MRE per epoch, as a PNG."""
    plot_training_curves(history, path, title, loss_label="MSE", metric="val_mre_mm",
                         metric_label="MRE (mm)", log_loss=True)


def _stack(cases: Sequence[PreparedCase], device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(np.stack([c.image for c in cases]), device=device)[:, None]
    coords = torch.as_tensor(np.stack([c.coords for c in cases]), device=device,
                             dtype=torch.float32)
    return images, coords


@torch.no_grad()
def validate(net: torch.nn.Module, cases: Sequence[PreparedCase], names: Sequence[str],
             cfg: TrainingConfig, device) -> tuple[float, dict, dict]:
    """(mean MSE, {case: {name: world}}, {case: {name: confidence}}) on ``cases``."""
    losses, preds, confs = [], {}, {}
    for c in cases:
        heat = predict_heatmaps([net], c.image, device)
        target = gaussian_heatmaps(torch.as_tensor(c.coords, device=device, dtype=torch.float32),
                                   c.image.shape, cfg.sigma)
        losses.append(float(F.mse_loss(heat, target)))
        world, conf, _ = decode_to_world(heat, c.grid, cfg.sigma, cfg.decode_radius)
        preds[c.case_id] = dict(zip(names, world))
        confs[c.case_id] = dict(zip(names, map(float, conf)))
    return float(np.mean(losses)), preds, confs


def train_fold(fold: int, train_cases: Sequence[PreparedCase], val_cases: Sequence[PreparedCase],
               names: Sequence[str], cfg: TrainingConfig, fold_dir: Path, device: torch.device,
               log: Callable[[str], None]) -> dict:
    """Train one fold; returns its final validation summary (or {} without validation)."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + fold)
    net = build_network({"model": cfg.model, "landmarks": names,
                         "model_kwargs": cfg.model_kwargs()}).to(device)
    opt = make_optimizer("adam", net, cfg.lr, cfg.weight_decay)
    augment = LandmarkAugmenter(cfg.augmentation, names, seed=cfg.seed * 1000 + fold)
    rng = np.random.default_rng(cfg.seed * 1000 + fold + 1)
    batch = min(cfg.batch_size, len(train_cases))
    iters = cfg.iterations_per_epoch or math.ceil(len(train_cases) / batch)
    shape = train_cases[0].image.shape
    refs = {c.case_id: dict(zip(names, c.world)) for c in val_cases}
    history, best = [], math.inf
    n_params = sum(p.numel() for p in net.parameters())
    log(f"fold {fold}: {len(train_cases)} training / {len(val_cases)} validation cases, "
        f"{cfg.model} ({n_params / 1e6:.2f} M parameters), {cfg.epochs} epochs x {iters} "
        f"iterations of batch {batch}, device {device}")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        net.train()
        order = list(rng.permutation(len(train_cases)))
        while len(order) < iters * batch:  # fill the last batches with a new shuffle
            order += list(rng.permutation(len(train_cases)))
        losses = []
        for it in range(iters):
            idx = order[it * batch:(it + 1) * batch]
            images, coords = _stack([train_cases[i] for i in idx], device)
            images, coords = augment(images, coords)
            target = gaussian_heatmaps(coords, shape, cfg.sigma)
            losses.append(optimisation_step(opt, F.mse_loss(net(images), target),
                                            f"fold {fold}, epoch {epoch}", cfg.lr))
        entry = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        line = f"fold {fold} epoch {epoch:3d}/{cfg.epochs}  train loss {entry['train_loss']:.3e}"
        if val_cases and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            val_loss, preds, confs = validate(net, val_cases, names, cfg, device)
            errs = radial_errors(preds, refs, names)
            mre = float(np.mean([e for c in errs.values() for e in c.values()]))
            entry.update(val_loss=val_loss, val_mre_mm=mre)
            line += f"  val loss {val_loss:.3e}  val MRE {mre:.2f} mm"
            if mre < best:
                best = mre
                _save(net, fold_dir / CHECKPOINTS["best"], epoch, cfg, names, mre)
                line += " (best)"
        entry["seconds"] = time.time() - t0
        history.append(entry)
        log(line + f"  {entry['seconds']:.1f} s")
        (fold_dir / "progress.json").write_text(json.dumps(history, indent=1) + "\n")
        plot_progress(history, fold_dir / "progress.png", f"{cfg.model}, fold {fold}")
    _save(net, fold_dir / CHECKPOINTS["final"], cfg.epochs, cfg, names,
          history[-1].get("val_mre_mm"))
    if not val_cases:
        return {}
    # preds / confs: the validation of the last epoch, i.e. of the final weights
    val_dir = fold_dir / "validation"
    val_dir.mkdir(exist_ok=True)
    for c in val_cases:
        write_landmarks(val_dir / f"{c.case_id}.json", preds[c.case_id],
                        confidence=confs[c.case_id], fold=fold, checkpoint="final")
    errs = radial_errors(preds, refs, names)
    summary = summarize_errors(errs, names)
    write_evaluation(summary, errs, fold_dir / "validation_metrics")
    log(f"fold {fold} final validation: {format_overall(summary)}")
    return summary


def _save(net, path: Path, epoch: int, cfg: TrainingConfig, names, val_mre) -> None:
    save_checkpoint(path, net, epoch=epoch, model=cfg.model, model_kwargs=cfg.model_kwargs(),
                    landmarks=list(names), val_mre_mm=val_mre)


def _check_existing(out_dir: Path, config: dict, splits: list[dict]) -> None:
    folder = model_folder(out_dir)
    if not folder.config_path.is_file():
        return
    old = folder.read_config()
    diff = [k for k in _FIXED_KEYS if old.get(k) != config.get(k)]
    if diff:
        raise UserError(f"{out_dir} holds a model trained with other settings ({', '.join(diff)} "
                        "differ). Use another --out folder, or the same settings to add folds.")
    split_path = out_dir / "splits.json"
    if split_path.is_file() and load_json(split_path) != splits:
        raise UserError(f"{split_path} splits other cases than the dataset now holds; use "
                        "another --out folder.")


def train_cross_validation(data_dir, out_dir, cfg: TrainingConfig,
                           folds_to_run: Optional[Sequence[int]] = None,
                           device: torch.device = torch.device("cpu"),
                           overwrite: bool = False, echo: bool = True) -> dict:
    """Train the requested folds (default: all) and, once every fold has validation
    predictions, write the pooled cross-validation evaluation. Returns
    {"folds": {k: summary}, "cv": summary or None}."""
    out_dir = Path(out_dir)
    cfg.check()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is an existing file; pass a folder for the model.")
    folder = model_folder(out_dir)
    folds_to_run = list(range(cfg.folds)) if folds_to_run is None else list(folds_to_run)
    bad = [k for k in folds_to_run if not 0 <= k < cfg.folds]
    if bad:
        raise UserError(f"--fold {bad[0]}: folds are numbered 0..{cfg.folds - 1}.")
    for k in folds_to_run:
        if (folder.fold_dir(k) / CHECKPOINTS["final"]).exists() and not overwrite:
            raise UserError(f"{folder.fold_dir(k)} already holds a trained model; pass "
                            "--overwrite to retrain it or choose another --out folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir / "train_log.txt", echo=echo, timestamps=False)
    log(f"reading {data_dir} and resampling to {tuple(cfg.size)} (x, y, z) ...")
    names, cases = load_training_cases(data_dir, cfg.size, cfg.antialias, log=log)
    if cfg.augmentation.flip_pairs:
        unknown = [n for p in cfg.augmentation.flip_pairs for n in p if n not in names]
        if unknown:
            raise UserError(f"--flip-pairs names unknown landmark(s) {', '.join(unknown)}; the "
                            f"dataset's landmarks are {', '.join(names)}.")
    splits = make_splits([c.case_id for c in cases], cfg.folds, cfg.seed)
    config = cfg.to_dict(names)
    _check_existing(out_dir, config, splits)
    folder.config_path.write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    (out_dir / "working_grids.json").write_text(json.dumps(
        {c.case_id: {"image": str(c.source), **c.grid.to_dict()} for c in cases}, indent=1) + "\n")
    log(f"{len(cases)} cases, landmarks: {', '.join(names)}")
    by_id = {c.case_id: c for c in cases}
    results = {}
    for k in folds_to_run:
        fold_dir = folder.fold_dir(k)
        fold_dir.mkdir(exist_ok=True)
        (fold_dir / "log.txt").write_text("")
        (fold_dir / "training_config.json").write_text(json.dumps(config, indent=2) + "\n")
        flog = RunLog(out_dir / "train_log.txt", fold_dir / "log.txt", echo=echo, timestamps=False)
        results[k] = train_fold(k, [by_id[c] for c in splits[k]["train"]],
                                [by_id[c] for c in splits[k]["val"]], names, cfg, fold_dir,
                                device, flog)
    cv = None
    if cfg.folds > 1 and all((out_dir / f"fold_{k}" / "validation" / f"{c}.json").is_file()
                             for k in range(cfg.folds) for c in splits[k]["val"]):
        from .io import read_landmarks

        preds = {c: read_landmarks(out_dir / f"fold_{k}" / "validation" / f"{c}.json")
                 for k in range(cfg.folds) for c in splits[k]["val"]}
        refs = {c.case_id: dict(zip(names, c.world)) for c in cases}
        errs = radial_errors(preds, refs, names)
        cv = summarize_errors(errs, names)
        write_evaluation(cv, errs, out_dir / "cv_evaluation")
        log(f"{cfg.folds}-fold cross-validation over {len(cases)} cases: {format_overall(cv)}")
        log(f"written {out_dir / 'cv_evaluation' / 'summary.md'}")
    return {"folds": results, "cv": cv, "landmarks": names}
