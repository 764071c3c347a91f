"""Synthetic BraTS 2023 GLI cases in the exact BraTS layout (for tests, demos and dry runs).

Each case is a skull-stripped "brain": an ellipsoid with a wavy outline, white matter inside a
grey-matter ribbon, two lateral ventricles and a thin rim of sulcal CSF, background exactly 0.
A glioma of random position, size, orientation and lobulated shape sits inside it: a
necrotic core (label 1) enclosed by an enhancing rim (label 3), enclosed by oedema (label 2).
The nesting holds voxel-exactly (6-neighbourhood): every neighbour of a necrosis voxel is
necrosis or enhancing tumour, every neighbour of a tumour-core voxel is tumour.

The four co-registered modalities show the labels the way MR scans do: the enhancing rim is
bright on T1c, necrosis dark on T1c and bright on T2, oedema bright on T2 and FLAIR and dark
on T1, CSF bright on T2 and suppressed on FLAIR. Images carry a smooth bias field, texture
and noise and are stored as int16 like the BraTS release; labels as uint8; 1 mm spacing.

The images are not meant to look real to a radiologist; they give a segmentation network
the same kind of signal as real scans, with the same files, names, shapes and labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import UserError
from .layout import MODALITIES, SEG, case_file_name

BRATS_SHAPE = (240, 240, 155)  # x, y, z as SimpleITK / NIfTI report it

# tissue classes of the synthetic anatomy
BACKGROUND, WHITE_MATTER, GREY_MATTER, CSF, NECROSIS, OEDEMA, ENHANCING = range(7)

#: Mean intensity of each tissue class per modality (white matter on T1 = 1).
TISSUE_CONTRAST = {
    #        bg    WM    GM    CSF   NCR   ED    ET
    "t1n": (0.0, 1.00, 0.70, 0.25, 0.35, 0.60, 0.65),
    "t1c": (0.0, 1.00, 0.72, 0.25, 0.30, 0.60, 1.60),
    "t2w": (0.0, 0.45, 0.65, 1.60, 1.30, 1.10, 0.85),
    "t2f": (0.0, 0.55, 0.75, 0.15, 0.60, 1.45, 1.00),
}
#: Scanner-like intensity scale per modality (arbitrary units, as in BraTS).
INTENSITY_SCALE = {"t1n": 900.0, "t1c": 1100.0, "t2w": 1300.0, "t2f": 800.0}

#: Label written into the seg file for each tumour tissue class.
TISSUE_TO_LABEL = {NECROSIS: 1, OEDEMA: 2, ENHANCING: 3}

_CROSS = ndimage.generate_binary_structure(3, 1)  # 6-neighbourhood


class SmoothRandomField:
    """A smooth random field: a sum of plane cosine waves with random directions and phases.

    ``SmoothRandomField(rng, n_waves, cycles)(z, y, x)`` evaluates it on the grid spanned by
    the 1D coordinate vectors z, y, x and returns a float32 array of shape (len(z), len(y),
    len(x)) with zero mean and unit variance; ``cycles`` is the typical number of periods per
    unit of the coordinates. Each wave is separable (a product of three 1D complex
    exponentials), so the sum over waves is one small matrix product.
    """

    def __init__(self, rng: np.random.Generator, n_waves: int = 6, cycles: float = 1.0):
        self.wave_vectors = rng.normal(size=(n_waves, 3)) * cycles
        self.phases = rng.uniform(0.0, 2.0 * np.pi, size=n_waves)

    def __call__(self, z, y, x) -> np.ndarray:
        z, y, x = (np.asarray(c, dtype=np.float64).ravel() for c in (z, y, x))
        w = self.wave_vectors
        ez = np.exp(1j * (2 * np.pi * w[:, :1] * z[None] + self.phases[:, None]))  # (K, Z)
        ey = np.exp(2j * np.pi * w[:, 1:2] * y[None])  # (K, Y)
        ex = np.exp(2j * np.pi * w[:, 2:] * x[None])  # (K, X)
        zy = (ez[:, :, None] * ey[:, None, :]).astype(np.complex64).reshape(len(w), -1)
        field = (zy.T @ ex.astype(np.complex64)).real.reshape(len(z), len(y), len(x))
        return (field * np.float32(np.sqrt(2.0 / len(w)))).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def synthesize_case(shape=BRATS_SHAPE, rng: np.random.Generator | None = None):
    """One synthetic case.

    Args:
        shape: image size (x, y, z) as SimpleITK reports it; the arrays are (z, y, x).
        rng: random generator (the case is a deterministic function of its state).

    Returns:
        ``(images, seg)``: ``images`` maps each modality of :data:`MODALITIES` to an int16
        array of shape (z, y, x), ``seg`` is a uint8 array of labels 0-3.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    nx, ny, nz = (int(s) for s in shape)
    if min(nx, ny, nz) < 16:
        raise UserError(f"synthetic image size {shape} is too small; use at least 16 voxels per axis")
    # brain centre and semi-axes in voxels (x: left-right, y: anterior-posterior, z: axial)
    centre = np.array([(nz - 1) / 2, (ny - 1) / 2, (nx - 1) / 2])
    semi_axes = np.array([0.40 * nz, 0.36 * ny, 0.30 * nx]) * rng.uniform(0.92, 1.05, size=3)
    z, y, x = (np.arange(n, dtype=np.float32)[sl] for n, sl in
               zip((nz, ny, nx), (np.s_[:, None, None], np.s_[None, :, None], np.s_[None, None, :])))
    uz, uy, ux = ((c - m) / np.float32(r) for c, m, r in zip((z, y, x), centre, semi_axes))
    axes = (uz.ravel(), uy.ravel(), ux.ravel())  # normalised 1D coordinates for the random fields

    # anatomy: wavy ellipsoid, grey-matter ribbon, ventricles, sulcal CSF
    radius = np.sqrt(uz * uz + uy * uy + ux * ux)
    radius = radius * (1 + 0.04 * SmoothRandomField(rng, 6, 1.0)(*axes))
    brain = radius < 1.0
    tissue = np.where(brain, WHITE_MATTER, BACKGROUND).astype(np.uint8)
    ribbon = radius > 0.80 + 0.05 * SmoothRandomField(rng, 8, 3.0)(*axes)
    tissue[brain & ribbon] = GREY_MATTER
    for side in (-1, 1):
        ventricle = ((ux - side * 0.13) / 0.09) ** 2 + ((uy + 0.05) / 0.38) ** 2 + ((uz - 0.08) / 0.16) ** 2
        tissue[brain & (ventricle < 1.0)] = CSF
    tissue[brain & (radius > 0.965)] = CSF

    # tumour: lobulated ellipsoids around a centre inside the brain
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    tumour_centre = centre + direction * rng.uniform(0.0, 0.3) * semi_axes
    wt_radius = rng.uniform(0.3, 0.5) * semi_axes.min()
    lobes = [(tumour_centre, 1.0)]
    for _ in range(rng.integers(1, 3)):
        offset = rng.normal(size=3)
        offset *= rng.uniform(0.2, 0.5) * wt_radius / np.linalg.norm(offset)
        lobes.append((tumour_centre + offset, rng.uniform(0.5, 0.8)))
    rotation = _random_rotation(rng)
    stretch = rng.uniform(0.75, 1.25, size=3)
    distance = np.full((nz, ny, nx), np.inf, dtype=np.float32)
    for lobe_centre, lobe_size in lobes:
        d = [c - np.float32(m) for c, m in zip((z, y, x), lobe_centre)]
        t = [sum(np.float32(rotation[i, j] / stretch[i]) * d[j] for j in range(3)) for i in range(3)]
        lobe = np.sqrt(t[0] ** 2 + t[1] ** 2 + t[2] ** 2) / np.float32(lobe_size * wt_radius)
        np.minimum(distance, lobe, out=distance)

    def perturbed(amplitude):
        field = SmoothRandomField(rng, 8, 2.0)(*axes)
        return distance * np.clip(1 + amplitude * field, 0.6, 1.6)

    tc_fraction = rng.uniform(0.45, 0.65)
    ncr_fraction = tc_fraction * rng.uniform(0.5, 0.75)
    # nesting by construction: each shell contains a one-voxel dilation of the one inside it,
    # and the inner shells stay 2-3 voxels away from the brain outline
    inner_brain = ndimage.binary_erosion(brain, _CROSS, iterations=2)
    necrosis = (perturbed(0.2) < ncr_fraction) & ndimage.binary_erosion(inner_brain, _CROSS)
    ci = tuple(int(round(c)) for c in tumour_centre)
    if inner_brain[ci]:
        necrosis[ci] = True
    core = ((perturbed(0.15) < tc_fraction) & inner_brain) | ndimage.binary_dilation(necrosis, _CROSS)
    whole = ((perturbed(0.12) < 1.0) & brain) | ndimage.binary_dilation(core, _CROSS)
    tissue[whole] = OEDEMA
    tissue[core] = ENHANCING
    tissue[necrosis] = NECROSIS

    seg = np.zeros(tissue.shape, dtype=np.uint8)
    for t, label in TISSUE_TO_LABEL.items():
        seg[tissue == t] = label

    texture = 1 + 0.04 * SmoothRandomField(rng, 10, 4.0)(*axes)
    tumour_texture = 1 + 0.1 * SmoothRandomField(rng, 10, 5.0)(*axes)
    heterogeneous = tissue >= NECROSIS
    images = {}
    for modality in MODALITIES:
        lut = np.asarray(TISSUE_CONTRAST[modality], dtype=np.float32)
        image = lut[tissue] * texture
        image[heterogeneous] *= tumour_texture[heterogeneous]
        image = ndimage.gaussian_filter(image, 0.6)
        bias = 1 + 0.08 * SmoothRandomField(rng, 4, 0.5)(*axes)
        image = image * bias + rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
        image = np.clip(image * INTENSITY_SCALE[modality], 0, 32767)
        image[~brain] = 0
        images[modality] = np.rint(image).astype(np.int16)
    return images, seg


def write_case(out_dir: str | Path, case_id: str, images: dict, seg: np.ndarray,
               spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """Write one case as ``out_dir/<case_id>/<case_id>-<suffix>.nii.gz`` (SimpleITK, gzip)."""
    import SimpleITK as sitk

    case_dir = Path(out_dir) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    for suffix, array in (*images.items(), (SEG, seg)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetOrigin(tuple(float(o) for o in origin))
        sitk.WriteImage(image, str(case_dir / case_file_name(case_id, suffix)), True)
    return case_dir


def synthetic_case_id(index: int) -> str:
    """Case name of the index-th synthetic case: ``BraTS-GLI-<index:05d>-000``."""
    return f"BraTS-GLI-{index:05d}-000"


def synthesize_dataset(out_dir: str | Path, n_cases: int, shape=BRATS_SHAPE, seed: int = 0,
                       overwrite: bool = False, verbose: bool = False) -> list[str]:
    """Write ``n_cases`` synthetic cases into ``out_dir`` in the BraTS 2023 layout.

    Case i is generated from ``numpy.random.default_rng([seed, i])``, so a data set is a
    deterministic function of (seed, shape) and its cases do not depend on ``n_cases``.
    Returns the case names.
    """
    if n_cases < 1:
        raise UserError(f"--cases must be at least 1, got {n_cases}")
    out_dir = Path(out_dir)
    case_ids = [synthetic_case_id(i) for i in range(n_cases)]
    existing = [c for c in case_ids if (out_dir / c).exists()]
    if existing and not overwrite:
        raise UserError(f"{out_dir / existing[0]} already exists ({len(existing)} of the {n_cases} case "
                        f"folders do); choose an empty output folder or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, case_id in enumerate(case_ids):
        images, seg = synthesize_case(shape, np.random.default_rng([seed, i]))
        write_case(out_dir, case_id, images, seg)
        if verbose:
            print(f"[{i + 1}/{n_cases}] {out_dir / case_id}", flush=True)
    return case_ids
