"""Landmark files and the landmark dataset layout.

Dataset folder (``nnmamba landmarks train --data DIR``)::

    DIR/images/<CASE>.nii.gz        one 3D scalar volume per case; any format SimpleITK reads
                                    (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .gipl, .gipl.gz)
    DIR/landmarks/<CASE>.json       its landmarks (or <CASE>.csv), same <CASE> name

Landmark files hold world coordinates in mm in the image's own world frame, i.e. what
SimpleITK / ITK report (LPS for NIfTI and DICOM):

* JSON: ``{"landmarks": {"name": [x, y, z], ...}}``; an optional
  ``"coordinate_system": "RAS"`` marks RAS points (3D Slicer's default); they are turned
  into LPS by negating x and y. Other keys (e.g. the ``confidence`` of predictions) are
  ignored by the reader.
* CSV: one ``name,x,y,z`` row per landmark; an optional header row ``name,x,y,z``.
* 3D Slicer markups, ``.fcsv`` and ``.mrk.json`` (RAS or LPS, as their header says); see
  :mod:`.markups`. Writing to such a file name writes that format.

Every case must have the same landmark names. Predictions are written as JSON in the same
format (LPS), so they can be read back by :func:`read_landmarks`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..errors import UserError
from ..safe_io import atomic_write_text, load_json
from .markups import MARKUPS_EXTENSIONS, is_markups_path, markups_text, reader_for

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl.gz", ".gipl")
LANDMARK_EXTENSIONS = MARKUPS_EXTENSIONS + (".json", ".csv")  # .mrk.json before .json
COORDINATE_SYSTEMS = ("LPS", "RAS")


def split_extension(name: str, extensions: Sequence[str]) -> Optional[tuple[str, str]]:
    """``("CASE", ".nii.gz")`` for a file name with one of ``extensions``, else None."""
    lower = name.lower()
    for ext in extensions:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None


def _coords(value, where: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise UserError(f"{where}: expected three finite numbers [x, y, z] in mm, got {value!r}. "
                        "Fix the coordinates in that file.")
    return arr


def _read_json(path: Path) -> dict[str, np.ndarray]:
    data = load_json(path, 'write it as {"landmarks": {"name": [x, y, z], ...}}')  # duplicate keys refused
    if not isinstance(data, dict) or not isinstance(data.get("landmarks"), dict):
        raise UserError(f'{path}: no "landmarks" object. Write the file as '
                        '{"landmarks": {"name": [x, y, z], ...}} (world coordinates in mm).')
    system = str(data.get("coordinate_system", "LPS")).upper()
    if system not in COORDINATE_SYSTEMS:
        raise UserError(f'{path}: "coordinate_system" is {system!r}; use "LPS" (ITK/SimpleITK '
                        'world coordinates, the default) or "RAS".')
    out = {}
    for name, value in data["landmarks"].items():
        if not str(name).strip():
            raise UserError(f"{path}: a landmark has an empty name. Give every landmark a name.")
        out[str(name).strip()] = _coords(value, f"{path}, landmark {name!r}")
    if system == "RAS":
        for v in out.values():
            v[:2] *= -1.0
    return out


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    try:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e}). Write one 'name,x,y,z' row "
                        "per landmark.") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["name", "x", "y", "z"]:
        rows = rows[1:]
    out = {}
    for line_no, row in enumerate(rows, 1):
        if len(row) != 4:
            raise UserError(f"{path}, row {line_no}: expected 4 columns 'name,x,y,z', got "
                            f"{len(row)}: {row!r}.")
        name = row[0].strip()
        if not name:
            raise UserError(f"{path}, row {line_no}: the landmark name is empty. Put the name "
                            "in the first column.")
        if name in out:
            raise UserError(f"{path}: landmark {name!r} appears twice. Keep one row per name.")
        out[name] = _coords(row[1:], f"{path}, row {line_no} ({name!r})")
    return out


def read_landmarks(path) -> dict[str, np.ndarray]:
    """Landmarks of one file as {name: world point (3,) in mm, LPS}; order kept."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: landmark file not found.")
    reader = reader_for(path) or (_read_csv if path.suffix.lower() == ".csv" else _read_json)
    out = reader(path)
    if not out:
        raise UserError(f"{path}: holds no landmarks. Add at least one 'name: [x, y, z]'.")
    return out


def write_landmarks(path, landmarks: Mapping[str, Sequence[float]], *, replace: bool = True,
                    **extra) -> None:
    """Write ``{"landmarks": {...}, "coordinate_system": "LPS", **extra}`` as JSON, through a
    temporary file and a rename (a symlink at ``path`` is replaced, never followed); with
    ``replace=False`` an existing file is an error. Commands check their outputs first
    (:func:`nnunet_mamba.safe_io.check_output_dir`)."""
    if is_markups_path(path):  # 3D Slicer .fcsv / .mrk.json: see markups.py
        atomic_write_text(path, markups_text(path, landmarks, **extra), overwrite=replace)
        return
    doc = {"landmarks": {k: [float(x) for x in v] for k, v in landmarks.items()},
           "coordinate_system": "LPS", **extra}
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n", overwrite=replace)


@dataclass(frozen=True)
class LandmarkCase:
    """One case of a landmark dataset: its id, image file and landmark file (or None)."""

    case_id: str
    image: Optional[Path]
    landmarks: Optional[Path]


def list_images(folder) -> dict[str, Path]:
    """{case id: image path} for the image files of ``folder`` (sorted by case id)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found.")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        hit = split_extension(p.name, IMAGE_EXTENSIONS) if p.is_file() else None
        if hit is None or p.name.startswith("."):
            continue
        case = hit[0]
        if case in found:
            raise UserError(f"{folder}: two images for case {case!r} ({found[case].name}, "
                            f"{p.name}). Keep one image per case.")
        found[case] = p
    if not found:
        raise UserError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return dict(sorted(found.items()))


def list_landmark_files(folder) -> dict[str, Path]:
    """{case id: landmark file} for the .json / .csv files of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: landmark folder not found.")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        hit = split_extension(p.name, LANDMARK_EXTENSIONS) if p.is_file() else None
        if hit is None or p.name.startswith("."):
            continue
        if hit[0] in found:
            raise UserError(f"{folder}: two landmark files for case {hit[0]!r} "
                            f"({found[hit[0]].name}, {p.name}). Keep one per case.")
        found[hit[0]] = p
    return dict(sorted(found.items()))


def landmark_folder(path) -> Path:
    """``path/landmarks`` if ``path`` is a dataset folder, else ``path`` itself."""
    path = Path(path)
    return path / "landmarks" if (path / "landmarks").is_dir() else path


def discover_dataset(data_dir) -> list[LandmarkCase]:
    """The cases of a dataset folder (layout in the module doc); every image needs a
    landmark file and every landmark file an image."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: dataset folder not found.")
    img_dir, lm_dir = data_dir / "images", data_dir / "landmarks"
    for d in (img_dir, lm_dir):
        if not d.is_dir():
            raise UserError(f"{data_dir}: missing the sub-folder '{d.name}/'. Put the volumes in "
                            f"{img_dir}/<CASE>.nii.gz and their landmarks in "
                            f"{lm_dir}/<CASE>.json (or .csv).")
    images, marks = list_images(img_dir), list_landmark_files(lm_dir)
    missing = [c for c in images if c not in marks]
    if missing:
        c = missing[0]
        more = (f" ({len(missing)} cases lack one: {', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''})" if len(missing) > 1 else "")
        raise UserError(f"case {c!r} ({images[c]}) has no landmark file; expected "
                        f"{lm_dir / c}.json (or .csv, Slicer's .fcsv / .mrk.json). Add it, or move the image out "
                        f"of {img_dir}{more}.")
    orphans = [c for c in marks if c not in images]
    if orphans:
        raise UserError(f"landmark file {marks[orphans[0]]} has no image {img_dir / orphans[0]}"
                        f".nii.gz (or another image format). Add the image or remove the file.")
    return [LandmarkCase(c, images[c], marks[c]) for c in images]


def check_landmark_names(per_case: Mapping[str, Mapping[str, object]],
                         expected: Optional[Sequence[str]] = None,
                         files: Optional[Mapping[str, Path]] = None,
                         expected_from: str = "the expected landmarks") -> list[str]:
    """The landmark names shared by all cases (order of ``expected`` or the first case).

    Raises :class:`UserError` naming the first case whose set differs (missing or extra
    names) and the fix; ``expected_from`` says where ``expected`` comes from.
    """
    if not per_case:
        raise UserError("no cases with landmarks.")
    first = next(iter(per_case))
    names = list(expected) if expected is not None else list(per_case[first])
    for case, marks in per_case.items():
        missing = [n for n in names if n not in marks]
        extra = [n for n in marks if n not in names]
        if missing or extra:
            where = f"{files[case]}" if files and case in files else f"case {case!r}"
            ref = expected_from if expected is not None else f"the landmarks of case {first!r}"
            parts = []
            if missing:
                parts.append(f"missing {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"extra {', '.join(map(repr, extra))}")
            raise UserError(f"{where} (case {case!r}): landmark names differ from {ref} "
                            f"({'; '.join(parts)}). Every case must name the same landmarks "
                            f"({', '.join(names)}); fix the names or remove the case.")
    return names
