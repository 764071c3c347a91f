"""The one place that reads image files (every command that reads images goes through here).

ITK's readers are lenient where a wrong number is worse than an error: its NIfTI reader
zero-fills the missing part of a truncated ``.nii`` / ``.nii.gz`` and turns NaN voxels into
0. :func:`read_image` therefore, before handing back a ``SimpleITK.Image``:

1. refuses paths that are not regular files (missing, a folder, a symlink loop);
2. for NIfTI, compares the voxel bytes present (the file size, or the length of the
   decompressed gzip stream, whose CRC is checked too) with the size declared by the
   header (``vox_offset + prod(dim) * bytes per voxel``) and refuses a short file;
3. reads the image with SimpleITK and refuses anything but a 3D scalar image;
4. refuses NaN / inf voxels, counted on the values as stored (for NIfTI with nibabel on the
   same decompressed bytes, since ITK has already replaced them by 0); integer NIfTI files
   without a non-finite scaling cannot hold them and are not scanned.

Every refusal is an :class:`ImageError` (a :class:`~nnunet_mamba.errors.UserError`) whose
message names the file, what is wrong and the fix; ``kind``, ``problem`` and ``fix`` are
also available separately for callers that collect problems (``brats2023 convert``).
"""
from __future__ import annotations

import errno
import gzip
import os
import stat
import zlib
from pathlib import Path

import numpy as np

from .errors import UserError

NIFTI_ENDINGS = (".nii.gz", ".nii")

_REPLACE = "re-download / re-export the file (it is damaged or incomplete)"


class ImageError(UserError):
    """An image file that cannot be used. ``kind`` is one of: missing, unreadable,
    truncated, not-3d, nonfinite."""

    def __init__(self, path, kind: str, problem: str, fix: str):
        self.path, self.kind, self.problem, self.fix = str(path), kind, problem, fix
        super().__init__(f"{path}: {problem}; {fix}")


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_ENDINGS)


def is_symlink_loop(path) -> bool:
    """True if resolving ``path`` fails with ELOOP (a link that leads back to itself)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _check_regular_file(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(path, "missing", "symlink loop (the link points back to itself)",
                             "replace the link by the image file or a link to it") from None
        raise ImageError(path, "missing", f"cannot be opened ({e.strerror or e})",
                         "check the path (a dangling symlink?) and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "missing", "not a regular file (a folder?)", "pass the image file itself")


def _sitk_reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _nifti_bytes(path: Path) -> bytes:
    """The whole (decompressed) NIfTI file; an ImageError for a damaged gzip stream."""
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"  # gzip magic (a '.nii.gz' may be stored plain)
        if compressed:
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        raise ImageError(path, "truncated", f"truncated or damaged compressed file ({e})",
                         _REPLACE) from None


def _nifti_check(path: Path) -> "object | None":
    """Header/byte-count check of a NIfTI file; returns the nibabel image (from the bytes)."""
    import nibabel

    data = _nifti_bytes(path)
    try:
        if len(data) < 348:
            raise ValueError(f"only {len(data)} bytes, shorter than a NIfTI header")
        nifti2 = 540 in (int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big"))
        image = (nibabel.Nifti2Image if nifti2 else nibabel.Nifti1Image).from_bytes(data)
        proxy = image.dataobj
        expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    except Exception as e:  # nibabel's header errors vary by version
        raise ImageError(path, "unreadable", f"invalid NIfTI header ({type(e).__name__}: {e})",
                         _REPLACE) from None
    if len(data) < expected:
        raise ImageError(path, "truncated", f"truncated NIfTI file ({len(data)} bytes of the {expected} its "
                         "header declares; a reader would fill the rest with zeros)", _REPLACE)
    return image


def _nifti_nonfinite(image) -> int:
    header = image.header
    if not np.issubdtype(header.get_data_dtype(), np.floating):
        slope, inter = header.get_slope_inter()
        if all(v is None or np.isfinite(v) for v in (slope, inter)):
            return 0
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))


def read_header(path):
    """A ``SimpleITK.ImageFileReader`` after ``ReadImageInformation()`` (no voxels read) of a
    3D scalar image; ImageError otherwise. Voxel checks happen in :func:`read_image`."""
    import SimpleITK as sitk

    path = Path(path)
    _check_regular_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageError(path, "unreadable", f"SimpleITK cannot read this image ({_sitk_reason(e)})",
                         "check that it is a complete NIfTI/NRRD/MHA image, or replace it") from None
    _check_3d_scalar(path, reader.GetDimension(), reader.GetNumberOfComponents())
    return reader


def _check_3d_scalar(path, dimension: int, components: int) -> None:
    if dimension != 3:
        raise ImageError(path, "not-3d", f"{dimension}D image, a 3D volume is expected",
                         "pass a 3D volume (split a 4D file into one 3D file per channel)")
    if components != 1:
        raise ImageError(path, "not-3d", f"vector image with {components} components per voxel",
                         "store each component as its own 3D scalar image")


def read_image(path, allow_nonfinite: bool = False):
    """The checked ``SimpleITK.Image`` of a 3D scalar image file (see the module doc).

    Raises :class:`ImageError` naming the file and the fix for a missing, unreadable,
    truncated or non-3D file, or one with NaN/inf voxels (unless ``allow_nonfinite``).
    """
    import SimpleITK as sitk

    path = Path(path)
    _check_regular_file(path)
    nib_image = _nifti_check(path) if is_nifti(path) else None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ImageError(path, "unreadable", f"SimpleITK cannot read this image ({_sitk_reason(e)})",
                         "check that it is a complete NIfTI/NRRD/MHA image, or replace it") from None
    _check_3d_scalar(path, image.GetDimension(), image.GetNumberOfComponentsPerPixel())
    if not allow_nonfinite:
        if nib_image is not None:
            n_bad = _nifti_nonfinite(nib_image)
        else:
            array = sitk.GetArrayViewFromImage(image)
            n_bad = (int(np.count_nonzero(~np.isfinite(array))) if np.issubdtype(array.dtype, np.floating)
                     else 0)
        if n_bad:
            raise ImageError(path, "nonfinite", f"{n_bad} NaN/inf voxel(s)",
                             "re-export the image without NaN/inf voxels (e.g. set them to 0, the background)")
    return image


def read_array(path, dtype=None):
    """``(array (z, y, x), image)`` of :func:`read_image` (``array`` a copy, cast to ``dtype``)."""
    import SimpleITK as sitk

    image = read_image(path)
    array = sitk.GetArrayFromImage(image)
    return (array if dtype is None else array.astype(dtype, copy=False)), image


def geometry(image_or_reader) -> dict:
    """size, spacing, origin, direction of an image or header reader (SimpleITK order x, y, z)."""
    size = image_or_reader.GetSize()
    return {"size": tuple(size), "spacing": tuple(image_or_reader.GetSpacing()),
            "origin": tuple(image_or_reader.GetOrigin()), "direction": tuple(image_or_reader.GetDirection())}
