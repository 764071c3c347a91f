"""Image preprocessing for classification, from nnU-Net's and SimpleITK's own functions.

Per row (one image per channel), in this order:

1. read with :func:`nnunet_mamba.imaging.read_image` (truncated files, which ITK would
   zero-fill silently, NaN/inf voxels and non-3D images are refused) and reorient with
   ``SimpleITK.DICOMOrient`` (default ``RAS``); the channels of a row must share one grid;
2. crop to the non-zero bounding box (nnU-Net's
   ``nnunetv2.preprocessing.cropping.cropping.crop_to_nonzero``; a no-op for images
   without a zero background);
3. z-score normalisation per channel with nnU-Net's ``ZScoreNormalization`` (over the
   non-zero region with ``nonzero_norm``, as nnU-Net does for skull-stripped brains; else
   over the whole cropped image);
4. resampling to the target spacing with nnU-Net's ``compute_new_shape`` and
   ``resample_data_or_seg_to_shape`` (third-order spline; nnU-Net's separate-z handling
   for anisotropic images);
5. centre crop or zero pad to the fixed size (padding with acvl_utils' ``pad_nd_image``,
   nnU-Net's padder).

Spacing and size are given in the image's (x, y, z) order, as SimpleITK reports them;
arrays are (C, z, y, x) as in nnU-Net. The configuration is stored next to the trained
models so prediction repeats exactly the same steps.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError
from ..imaging import read_header, read_image
from .table import CaseRow, ClassificationTable


@dataclass
class PreprocessingConfig:
    """What :func:`preprocess_case` does; ``target_spacing`` None = keep each image's spacing
    (training resolves it to the median spacing of the training images first)."""

    orientation: str = "RAS"
    target_spacing: Optional[tuple[float, float, float]] = None  # mm, (x, y, z)
    size: tuple[int, int, int] = (96, 96, 96)  # voxels, (x, y, z)
    nonzero_norm: bool = False

    def __post_init__(self):
        if self.target_spacing is not None:
            self.target_spacing = tuple(float(s) for s in self.target_spacing)
            if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
                raise UserError(f"target spacing {self.target_spacing} must be three positive "
                                "numbers (x y z, mm)")
        self.size = tuple(int(s) for s in self.size)
        if len(self.size) != 3 or min(self.size) < 16:
            raise UserError(f"size {self.size} must be three numbers >= 16 (x y z voxels): the "
                            "networks halve each axis four times")
        try:
            _check_orientation(self.orientation)
        except RuntimeError:
            raise UserError(f"orientation {self.orientation!r} is not a valid 3-letter code such "
                            "as RAS or LPS") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessingConfig":
        return cls(orientation=d["orientation"], target_spacing=d["target_spacing"],
                   size=tuple(d["size"]), nonzero_norm=bool(d["nonzero_norm"]))


def _check_orientation(orientation: str) -> None:
    import SimpleITK as sitk
    sitk.DICOMOrient(sitk.Image([2, 2, 2], sitk.sitkUInt8), orientation)


def _oriented_permutation(direction: Sequence[float], orientation: str) -> list[int]:
    """Index axis that becomes axis j after DICOMOrient (from the direction cosines only)."""
    import SimpleITK as sitk
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    probe.SetDirection(direction)
    new_dir = np.array(sitk.DICOMOrient(probe, orientation).GetDirection()).reshape(3, 3)
    old_dir = np.array(direction).reshape(3, 3)
    return [int(np.argmax(np.abs(old_dir.T @ new_dir[:, j]))) for j in range(3)]


def read_geometry(path: Path, orientation: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Spacing (x, y, z) and size (x, y, z) of an image after reorientation, from its header
    (read by :func:`nnunet_mamba.imaging.read_header`: 3D scalar images only)."""
    reader = read_header(path)
    perm = _oriented_permutation(reader.GetDirection(), orientation)
    spacing, size = reader.GetSpacing(), reader.GetSize()
    return tuple(spacing[p] for p in perm), tuple(size[p] for p in perm)


def check_images(table: ClassificationTable, orientation: str) -> list[tuple[float, ...]]:
    """Read every header (no voxel data); returns the oriented (x, y, z) spacing per row.

    Raises a UserError naming the CSV line for an unreadable file or channels of one row
    whose grids differ.
    """
    spacings = []
    for row in table.rows:
        geoms = [_with_row(table, row, read_geometry, p, orientation) for p in row.images]
        for (sp, sz), p in zip(geoms[1:], row.images[1:]):
            if sz != geoms[0][1] or not np.allclose(sp, geoms[0][0], rtol=1e-3):
                raise UserError(
                    f"{_where(table, row)}: channel images differ in grid: {row.images[0]} has "
                    f"size {geoms[0][1]}, spacing {tuple(round(s, 4) for s in geoms[0][0])} but "
                    f"{p} has size {sz}, spacing {tuple(round(s, 4) for s in sp)}; resample the "
                    "channels of a subject onto one grid first")
        spacings.append(geoms[0][0])
    return spacings


def median_spacing(spacings: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """Per-axis median spacing (nnU-Net's default target spacing for isotropic data)."""
    return tuple(float(s) for s in np.median(np.asarray(spacings, dtype=float), axis=0))


def _load_oriented(path: Path, orientation: str):
    """(z, y, x) float32 array and spacing of an image read by the one image reader
    (:func:`nnunet_mamba.imaging.read_image`: truncated files and NaN/inf voxels refused)."""
    import SimpleITK as sitk
    image = sitk.DICOMOrient(read_image(path), orientation)
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    return array, tuple(image.GetSpacing())[::-1]


def center_crop_or_pad(data: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(C, *spatial) -> (C, *shape): zero padding (content centred) and centre cropping."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    data = pad_nd_image(data, tuple(shape), "constant", {"constant_values": 0})
    slicer = tuple(slice((s - t) // 2, (s - t) // 2 + t) for s, t in zip(data.shape[1:], shape))
    return np.ascontiguousarray(data[(slice(None),) + slicer])


def preprocess_case(paths: Sequence[Path], config: PreprocessingConfig) -> np.ndarray:
    """Read and preprocess one row's channel images -> float32 (C, z, y, x) of ``config.size``
    (reversed to z, y, x). See the module docstring for the steps."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        ZScoreNormalization)
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape, resample_data_or_seg_to_shape)

    arrays, spacing = [], None
    for path in paths:
        array, sp = _load_oriented(Path(path), config.orientation)
        if arrays and (array.shape != arrays[0].shape or not np.allclose(sp, spacing, rtol=1e-3)):
            raise UserError(f"{path}: its grid {array.shape[::-1]} differs from that of "
                            f"{paths[0]} {arrays[0].shape[::-1]}; resample the channels onto "
                            "one grid first")
        arrays.append(array)
        spacing = sp
    data = np.stack(arrays)
    if not np.any(data):
        raise UserError(f"{paths[0]}: the image is all zeros; remove the row or fix the file")
    data, seg, _ = crop_to_nonzero(data)
    normaliser = ZScoreNormalization(use_mask_for_norm=config.nonzero_norm,
                                     intensityproperties={}, target_dtype=np.float32)
    for c in range(data.shape[0]):
        data[c] = normaliser.run(data[c], seg[0])
    if config.target_spacing is not None:
        target = tuple(config.target_spacing)[::-1]  # (z, y, x)
        new_shape = compute_new_shape(data.shape[1:], spacing, target)
        if tuple(new_shape) != tuple(data.shape[1:]):
            data = resample_data_or_seg_to_shape(data, new_shape, spacing, target, is_seg=False,
                                                 order=3, order_z=0, force_separate_z=None)
    return center_crop_or_pad(data.astype(np.float32, copy=False), tuple(config.size)[::-1])


def _where(table: ClassificationTable, row: CaseRow) -> str:
    return f"{table.csv_path}, line {row.line} (subject {row.subject})"


def _with_row(table, row, fn, *args):
    try:
        return fn(*args)
    except UserError as e:
        raise UserError(f"{_where(table, row)}: {e}") from None


def _preprocess_to_file(job):
    table, row, config, out_file = job
    data = _with_row(table, row, preprocess_case, row.images, config)
    np.save(out_file, data)
    return str(out_file)


def preprocess_table(table: ClassificationTable, config: PreprocessingConfig, out_dir: Path,
                     num_processes: int = 1, progress=None) -> list[Path]:
    """Preprocess every row to ``out_dir/<row index>.npy``; returns the files in row order.

    ``progress``: optional callable(done, total) for a progress display.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / f"{i:05d}.npy" for i in range(len(table.rows))]
    jobs = [(table, row, config, f) for row, f in zip(table.rows, files)]
    if num_processes > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(num_processes) as pool:
            for done, _ in enumerate(pool.imap(_preprocess_to_file, jobs), 1):
                if progress:
                    progress(done, len(jobs))
    else:
        for done, job in enumerate(jobs, 1):
            _preprocess_to_file(job)
            if progress:
                progress(done, len(jobs))
    return files
