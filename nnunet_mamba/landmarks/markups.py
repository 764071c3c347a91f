"""3D Slicer markups: point lists as ``.fcsv`` and ``.mrk.json`` (read and write).

Landmarks inside nnunet-mamba are world points in mm in the image's ITK/SimpleITK frame,
which is LPS (x grows to the patient's Left, y to Posterior, z to Superior). 3D Slicer's
world frame is RAS; the same physical point has x and y negated there. Slicer states the
frame of a markups file in the file itself, and both are read here:

* ``.fcsv`` (Slicer's "Markups fiducial" CSV)::

      # Markups fiducial file version = 4.11
      # CoordinateSystem = LPS            (or RAS; legacy files: 0 = RAS, 1 = LPS)
      # columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID
      1,-12.5,30.25,4.0,0,0,0,1,1,1,0,nasion,,

  A file without a ``CoordinateSystem`` line is RAS (Slicer before 4.11 wrote only RAS).
  ``# columns =`` sets the column order when present. The landmark name is ``label``.
* ``.mrk.json`` (Slicer >= 4.11)::

      {"@schema": ".../markups-schema-v1.0.0.json#",
       "markups": [{"type": "Fiducial", "coordinateSystem": "LPS",
                    "controlPoints": [{"label": "nasion", "position": [x, y, z]}, ...]}]}

  Every ``Fiducial`` (point list) markup of the file is read; ``coordinateSystem`` (RAS or
  LPS) is per markup, LPS when absent (Slicer's default). Points whose ``positionStatus``
  is ``undefined`` (placeholders of a template) are refused with the point's name.

Readers return ``{name: (3,) LPS point}`` in file order, as :func:`.io.read_landmarks`;
writers take LPS points and write them in the requested ``coordinate_system`` (LPS by
default, what Slicer >= 4.11 writes itself). :func:`.io.read_landmarks` and
:func:`.io.write_landmarks` dispatch here by file name.
"""
from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..errors import UserError

FCSV = ".fcsv"
MRK_JSON = ".mrk.json"
MARKUPS_EXTENSIONS = (MRK_JSON, FCSV)
#: the output file ending of each ``--format`` of ``nnmamba landmarks predict``
FORMAT_SUFFIXES = {"json": ".json", "slicer": MRK_JSON, "fcsv": FCSV}
FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label",
                "desc", "associatedNodeID")
MRK_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
              "Markups/Resources/Schema/markups-schema-v1.0.0.json#")
_SYSTEMS = {"RAS": "RAS", "0": "RAS", "LPS": "LPS", "1": "LPS"}
_RAS_LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)


def _to_lps(point: np.ndarray, system: str) -> np.ndarray:
    return point * _RAS_LPS if system == "RAS" else point


def _system(value, path: Path, where: str) -> str:
    system = _SYSTEMS.get(str(value).strip().upper())
    if system is None:
        raise UserError(f"{path}: {where} is {value!r}; nnunet-mamba reads RAS (0) and LPS (1). "
                        "Save the markups from Slicer again (world coordinates, not IJK).")
    return system


def _point(values, path: Path, where: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise UserError(f"{path}, {where}: expected three finite coordinates in mm, got "
                        f"{values!r}. Fix or delete that point in Slicer and save again.")
    return arr


def _add(out: dict, name, point: np.ndarray, path: Path, where: str) -> None:
    name = str(name or "").strip()
    if not name:
        raise UserError(f"{path}, {where}: the point has no label. Name every control point "
                        "(its label is the landmark name).")
    if name in out:
        raise UserError(f"{path}: landmark {name!r} appears twice. Keep one point per name.")
    out[name] = point


def is_markups_path(path) -> bool:
    """True for ``*.fcsv`` and ``*.mrk.json`` file names."""
    return str(path).lower().endswith(MARKUPS_EXTENSIONS)


def read_fcsv(path) -> dict[str, np.ndarray]:
    """The points of a Slicer ``.fcsv`` file as ``{label: LPS point (3,)}`` in mm."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable .fcsv file ({e}).") from None
    system, columns, rows = "RAS", list(FCSV_COLUMNS), []
    for line_no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            key, sep, value = stripped.lstrip("#").partition("=")
            key = key.strip().lower()
            if sep and key == "coordinatesystem":
                system = _system(value, path, "'# CoordinateSystem'")
            elif sep and key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif stripped:
            rows.append((line_no, line))
    missing = [c for c in ("x", "y", "z", "label") if c not in columns]
    if missing:
        raise UserError(f"{path}: the '# columns =' line lacks {', '.join(missing)}. Expected "
                        f"{','.join(FCSV_COLUMNS)}.")
    ix = [columns.index(c) for c in ("x", "y", "z")]
    il = columns.index("label")
    out: dict[str, np.ndarray] = {}
    for line_no, line in rows:
        try:
            cells = next(csv.reader([line]))
        except csv.Error as e:
            raise UserError(f"{path}, line {line_no}: not a CSV row ({e}).") from None
        if len(cells) <= max(ix + [il]):
            raise UserError(f"{path}, line {line_no}: {len(cells)} columns, expected "
                            f"{len(columns)} ({','.join(columns)}).")
        where = f"line {line_no}"
        _add(out, cells[il], _to_lps(_point([cells[i] for i in ix], path, where), system),
             path, where)
    return out


def read_mrk_json(path) -> dict[str, np.ndarray]:
    """The points of the point-list markups of a Slicer ``.mrk.json`` file as
    ``{label: LPS point (3,)}`` in mm."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable markups JSON file ({e}).") from None
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list):
        raise UserError(f'{path}: no "markups" list; this is not a Slicer .mrk.json file. Save '
                        "the point list from Slicer (Markups JSON) or use our JSON format.")
    lists = [m for m in markups if isinstance(m, dict)
             and str(m.get("type", "Fiducial")).lower() in ("fiducial", "pointlist")]
    if not lists:
        types = sorted({str(m.get("type")) for m in markups if isinstance(m, dict)})
        raise UserError(f"{path}: no point list (type 'Fiducial') among its markups "
                        f"({', '.join(types) or 'none'}). Landmarks must be a point list.")
    out: dict[str, np.ndarray] = {}
    for k, markup in enumerate(lists):
        system = _system(markup.get("coordinateSystem", "LPS"), path,
                         f'"coordinateSystem" of markup {k}')
        units = str(markup.get("coordinateUnits", "mm"))
        if units != "mm":
            raise UserError(f'{path}: "coordinateUnits" is {units!r}; only mm is supported.')
        for j, cp in enumerate(markup.get("controlPoints") or []):
            name = cp.get("label", "")
            where = f"markup {k}, control point {j} ({name!r})"
            if cp.get("positionStatus", "defined") == "undefined" or "position" not in cp:
                raise UserError(f"{path}, {where}: the point is not placed (positionStatus "
                                "undefined). Place it in Slicer or delete it, then save again.")
            _add(out, name, _to_lps(_point(cp["position"], path, where), system), path, where)
    return out


def reader_for(path) -> Optional[Callable[[Path], dict]]:
    """The markups reader for ``path`` (.fcsv, .mrk.json, or a .json file holding a Slicer
    ``"markups"`` list), else None."""
    name = str(path).lower()
    if name.endswith(FCSV):
        return read_fcsv
    if name.endswith(MRK_JSON):
        return read_mrk_json
    if name.endswith(".json"):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None  # the JSON reader reports it
        if isinstance(data, dict) and "markups" in data and "landmarks" not in data:
            return read_mrk_json
    return None


def _points_in(landmarks: Mapping[str, Sequence[float]], system: str) -> dict[str, list[float]]:
    if system not in ("LPS", "RAS"):
        raise ValueError(f"coordinate_system must be 'LPS' or 'RAS', got {system!r}")
    out = {}
    for name, p in landmarks.items():
        arr = np.asarray(p, dtype=np.float64).reshape(3)
        out[str(name)] = [float(v) for v in _to_lps(arr, system)]  # LPS->RAS: same flip
    return out


def _descriptions(names, confidence: Optional[Mapping[str, float]]) -> dict[str, str]:
    if not confidence:
        return {n: "" for n in names}
    return {n: (f"confidence {float(confidence[n]):.3f}" if n in confidence else "")
            for n in names}


def fcsv_text(landmarks: Mapping[str, Sequence[float]], coordinate_system: str = "LPS",
              confidence: Optional[Mapping[str, float]] = None) -> str:
    """A Slicer ``.fcsv`` document of LPS ``landmarks`` written in ``coordinate_system``;
    each point's ``desc`` holds its confidence when given."""
    points = _points_in(landmarks, coordinate_system)
    desc = _descriptions(points, confidence)
    buf = _io.StringIO()
    buf.write("# Markups fiducial file version = 4.11\n"
              f"# CoordinateSystem = {coordinate_system}\n"
              f"# columns = {','.join(FCSV_COLUMNS)}\n")
    writer = csv.writer(buf, lineterminator="\n")
    for k, (name, (x, y, z)) in enumerate(points.items(), 1):
        writer.writerow([k, repr(x), repr(y), repr(z), 0, 0, 0, 1, 1, 1, 0, name, desc[name], ""])
    return buf.getvalue()


def mrk_json_text(landmarks: Mapping[str, Sequence[float]], coordinate_system: str = "LPS",
                  confidence: Optional[Mapping[str, float]] = None) -> str:
    """A Slicer ``.mrk.json`` document (one point list) of LPS ``landmarks`` written in
    ``coordinate_system``; each point's description holds its confidence when given."""
    points = _points_in(landmarks, coordinate_system)
    desc = _descriptions(points, confidence)
    # the point's orientation matrix: identity in RAS, i.e. diag(-1, -1, 1) in LPS
    orient = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0] if coordinate_system == "RAS" else \
        [-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0]
    doc = {"@schema": MRK_SCHEMA, "markups": [{
        "type": "Fiducial", "coordinateSystem": coordinate_system, "locked": False,
        "labelFormat": "%N-%d",
        "controlPoints": [{"id": str(k), "label": name, "description": desc[name],
                           "associatedNodeID": "", "position": p, "orientation": orient,
                           "selected": True, "locked": False, "visibility": True,
                           "positionStatus": "defined"}
                          for k, (name, p) in enumerate(points.items(), 1)]}]}
    return json.dumps(doc, indent=2) + "\n"


def markups_text(path, landmarks: Mapping[str, Sequence[float]], coordinate_system: str = "LPS",
                 confidence: Optional[Mapping[str, float]] = None, **_ignored) -> str:
    """The ``.fcsv`` or ``.mrk.json`` document (by ``path``'s ending) of LPS ``landmarks``.

    :func:`.io.write_landmarks` writes it (atomically). Its other keyword arguments (voxel
    indices, provenance) have no place in Slicer's formats and are left out.
    """
    name = Path(path).name.lower()
    if name.endswith(FCSV):
        return fcsv_text(landmarks, coordinate_system, confidence)
    if name.endswith(MRK_JSON):
        return mrk_json_text(landmarks, coordinate_system, confidence)
    raise ValueError(f"{path}: not a markups file name (expected {FCSV} or {MRK_JSON})")


__all__ = ["read_fcsv", "read_mrk_json", "reader_for", "markups_text", "fcsv_text",
           "mrk_json_text", "is_markups_path", "MARKUPS_EXTENSIONS", "FORMAT_SUFFIXES"]
