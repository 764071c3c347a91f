"""Heatmap inference: model folders, fold ensembles and decoding to world coordinates.

A trained model folder (``nnmamba landmarks train --out DIR``) holds ``config.json`` and
``fold_<k>/checkpoint_final.pt`` (and ``checkpoint_best.pt``) per trained fold. Prediction
resamples each image onto its working grid exactly as in training, averages the heatmaps
of the fold models (the ensemble), decodes them (arg-max + sharpened local soft-argmax,
:func:`~.heatmaps.decode_heatmaps`) and maps the positions back to world mm through the
grid's geometry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..networks import registry
from ..runkit import ModelFolder, resolve_device
from ..runkit.model_folder import check_folds
from ..networks.nnmamba_landmark import HeatmapUNet
from .data import read_image, to_working_grid
from .geometry import WorkingGrid, world_to_index
from .heatmaps import decode_heatmaps
from .io import list_images, write_landmarks
from .markups import FORMAT_SUFFIXES

CONFIG_NAME = "config.json"
CHECKPOINTS = {"final": "checkpoint_final.pt", "best": "checkpoint_best.pt"}


def model_folder(path) -> ModelFolder:
    """The layout of a landmark model folder (``--out`` of ``nnmamba landmarks train``)."""
    return ModelFolder(path, CONFIG_NAME, "nnmamba landmarks train")


def build_network(config: dict) -> HeatmapUNet:
    """The network described by a model folder's config (fresh weights)."""
    return registry.build("landmarks", config["model"], 1, len(config["landmarks"]),
                          **config["model_kwargs"])


@torch.no_grad()
def predict_heatmaps(models: Sequence[torch.nn.Module], image: np.ndarray,
                     device: torch.device) -> torch.Tensor:
    """Mean heatmaps (K, D, H, W) of the models for one normalised (D, H, W) volume."""
    x = torch.as_tensor(image, dtype=torch.float32, device=device)[None, None]
    total = None
    for m in models:
        m.eval()
        h = m(x)[0].float()
        total = h if total is None else total + h
    return total / len(models)


def decode_to_world(heatmaps: torch.Tensor, grid: WorkingGrid, sigma: float,
                    radius: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(world points (K, 3) mm, confidences (K,), working-grid array coords (K, 3))."""
    coords, peaks = decode_heatmaps(heatmaps, radius=radius, sigma=sigma)
    return grid.array_to_world(coords), peaks, coords


@dataclass
class LandmarkModel:
    """A trained model folder loaded for prediction: its config and the fold networks."""

    folder: Path
    config: dict
    folds: list[int]
    networks: list[torch.nn.Module]

    @property
    def names(self) -> list[str]:
        return list(self.config["landmarks"])


def load_config(folder) -> dict:
    return model_folder(folder).read_config()


def load_model(folder, folds: Optional[Sequence[int]] = None, checkpoint: str = "final",
               device: torch.device = torch.device("cpu")) -> LandmarkModel:
    """Load the fold networks of a model folder (all trained folds unless ``folds``)."""
    mf = model_folder(folder)
    config = mf.read_config()
    name = CHECKPOINTS[checkpoint]
    trained = mf.trained_folds(name)
    if folds is None and not trained:
        raise UserError(f"{mf.root}: no fold_<k>/{name}. Train first (nnmamba landmarks "
                        f"train) or choose --checkpoint {'best' if checkpoint == 'final' else 'final'}.")
    folds = check_folds(None if folds is None else list(folds), trained, mf.root)
    nets = mf.load_ensemble({k: mf.checkpoint_name(k, name) for k in folds},
                            lambda ckpt: build_network(config), device)
    return LandmarkModel(mf.root, config, folds, nets)


def predict_folder(model: LandmarkModel, images_dir, out_dir, device: torch.device,
                   log=print, fmt: str = "json") -> list[str]:
    """Predict every image of ``images_dir``; writes ``out_dir/<CASE>.json`` (``fmt`` 'json'),
    3D Slicer's ``<CASE>.mrk.json`` ('slicer') or ``<CASE>.fcsv`` ('fcsv')."""
    cfg = model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = list_images(images_dir)
    for i, (case, path) in enumerate(images.items(), 1):
        image = read_image(path, case)
        array, grid = to_working_grid(image, cfg["size"], cfg.get("antialias", True))
        heat = predict_heatmaps(model.networks, array, device)
        world, conf, _ = decode_to_world(heat, grid, cfg["sigma"], cfg.get("decode_radius", 3))
        index = world_to_index(image, world)
        write_landmarks(out_dir / f"{case}{FORMAT_SUFFIXES[fmt]}", dict(zip(model.names, world)),
                        confidence={n: float(c) for n, c in zip(model.names, conf)},
                        voxel_index={n: [float(v) for v in ix]
                                     for n, ix in zip(model.names, index)},
                        image=str(path), model=str(model.folder), folds=model.folds,
                        working_grid=grid.to_dict())
        if log is not None:
            low = [n for n, c in zip(model.names, conf) if c < 0.3]
            log(f"[{i}/{len(images)}] {case}: mean confidence {float(np.mean(conf)):.2f}"
                + (f" (low: {', '.join(low)})" if low else ""))
    return list(images)


__all__ = ["resolve_device", "predict_heatmaps", "decode_to_world", "load_model",
           "predict_folder", "LandmarkModel"]
