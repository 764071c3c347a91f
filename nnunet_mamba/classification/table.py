"""The CSV that describes a classification data set, read and checked before anything runs.

One row per image set: a subject id, one column per image channel (paths absolute or
relative to the CSV's folder) and a label. A subject may have several rows (several scans):
they must share one label, and the splits keep them together. Every problem is reported as
a :class:`~nnunet_mamba.errors.UserError` naming the CSV line and the fix.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError

#: inferred class lists longer than this are refused (a continuous label or a wrong column)
MAX_INFERRED_CLASSES = 20


@dataclass(frozen=True)
class CaseRow:
    """One CSV row: ``line`` is its line number in the file (the header is line 1)."""

    line: int
    subject: str
    images: tuple[Path, ...]
    label: Optional[str]


@dataclass
class ClassificationTable:
    """The checked rows of a classification CSV.

    ``classes`` is the class order: class i is logit i; for two classes the last one is the
    positive class of SEN/SPE/PRE/F1.
    """

    csv_path: Path
    rows: list[CaseRow]
    image_columns: tuple[str, ...]
    classes: tuple[str, ...]

    @property
    def num_channels(self) -> int:
        return len(self.image_columns)

    def label_indices(self) -> list[int]:
        """Class index of every row (rows must be labelled)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[r.label] for r in self.rows]

    def subjects(self) -> list[str]:
        """Unique subject ids in order of first appearance."""
        return list(dict.fromkeys(r.subject for r in self.rows))

    def subject_label_indices(self) -> dict[str, int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return {r.subject: index[r.label] for r in self.rows}

    def describe(self) -> str:
        counts = {c: 0 for c in self.classes}
        for subject, label in self.subject_label_indices().items():
            counts[self.classes[label]] += 1
        per_class = ", ".join(f"{c}: {n}" for c, n in counts.items())
        return (f"{len(self.rows)} rows, {len(self.subjects())} subjects ({per_class}), "
                f"{self.num_channels} channel(s) {list(self.image_columns)}")


def _sort_classes(labels: set[str]) -> tuple[str, ...]:
    """Numeric labels in numeric order, other labels in alphabetical order."""
    try:
        return tuple(sorted(labels, key=float))
    except ValueError:
        return tuple(sorted(labels))


def read_table(csv_path: str | Path, id_column: str = "subject",
               image_columns: Optional[Sequence[str]] = None, label_column: str = "label",
               classes: Optional[Sequence[str]] = None, require_labels: bool = True,
               check_files: bool = True) -> ClassificationTable:
    """Read and check a classification CSV.

    ``image_columns`` default: every column whose name starts with ``image`` (in file order).
    ``classes`` declares the class order; without it the classes are inferred from the labels
    (numbers in numeric order, other labels alphabetically), with checks against typos
    (labels that differ only by case or spaces) and continuous labels. With
    ``require_labels=False`` (prediction) the label column may be absent and is ignored.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: CSV file not found; pass an existing file with --csv")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            raw_rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{csv_path}: cannot read the CSV ({e}); save it as UTF-8 CSV") from None
    if not header:
        raise UserError(f"{csv_path}: empty CSV; the first line must be a header such as "
                        f"'{id_column},image,{label_column}'")
    if id_column not in header:
        raise UserError(f"{csv_path}: no subject-id column {id_column!r} (columns: {header}); "
                        "rename the column or pass --id-column")
    if image_columns:
        missing = [c for c in image_columns if c not in header]
        if missing:
            raise UserError(f"{csv_path}: image column(s) {missing} not found (columns: {header}); "
                            "fix --image-columns or the header")
        image_columns = tuple(image_columns)
    else:
        image_columns = tuple(h for h in header if h.lower().startswith("image"))
        if not image_columns:
            raise UserError(f"{csv_path}: no image column (columns: {header}); name them "
                            "'image' or 'image_0000', 'image_0001', ... or pass --image-columns")
    has_labels = label_column in header
    if require_labels and not has_labels:
        raise UserError(f"{csv_path}: no label column {label_column!r} (columns: {header}); "
                        "rename the column or pass --label-column")
    if not raw_rows:
        raise UserError(f"{csv_path}: the CSV has a header but no rows")

    rows: list[CaseRow] = []
    for i, raw in enumerate(raw_rows):
        line = i + 2
        raw = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in
               raw.items()}
        subject = raw.get(id_column, "")
        where = f"{csv_path}, line {line}"
        if not subject:
            raise UserError(f"{where}: empty subject id in column {id_column!r}; fill it in")
        images = []
        for col in image_columns:
            value = raw.get(col, "")
            if not value:
                raise UserError(f"{where} (subject {subject}): empty image path in column "
                                f"{col!r}; give a path for every channel or remove the row")
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = (csv_path.parent / path).resolve()
            if check_files and not path.is_file():
                raise UserError(f"{where} (subject {subject}): image file {path} not found "
                                f"(column {col!r}); fix the path (relative paths are read from "
                                f"{csv_path.parent})")
            images.append(path)
        label = raw.get(label_column) if has_labels else None
        if require_labels and not label:
            raise UserError(f"{where} (subject {subject}): label missing in column "
                            f"{label_column!r}; fill it in or remove the row")
        rows.append(CaseRow(line, subject, tuple(images), label or None))

    if require_labels:
        classes = _check_classes(csv_path, rows, classes, label_column)
        _check_subjects(csv_path, rows)
    else:
        classes = tuple(classes or ())
    return ClassificationTable(csv_path, rows, image_columns, tuple(classes))


def _check_classes(csv_path: Path, rows: list[CaseRow], classes, label_column: str):
    labels = {r.label for r in rows}
    if classes:
        classes = tuple(str(c).strip() for c in classes)
        if len(set(classes)) != len(classes):
            raise UserError(f"--classes {list(classes)} lists a class twice; list each once")
        for r in rows:
            if r.label not in classes:
                raise UserError(
                    f"{csv_path}, line {r.line} (subject {r.subject}): label {r.label!r} is not "
                    f"one of the declared classes {list(classes)}; fix the label or add it to "
                    "--classes")
    else:
        classes = _sort_classes(labels)
        numbers: dict[float, list[str]] = {}
        for c in classes:
            try:
                numbers.setdefault(float(c), []).append(c)
            except ValueError:
                pass
        same = [v for v in numbers.values() if len(v) > 1]
        if same:
            raise UserError(f"{csv_path}: labels {sorted(same[0])} in column {label_column!r} are one number "
                            "written differently and would become two classes; write them identically "
                            "or declare --classes")
        normalised: dict[str, list[str]] = {}
        for c in classes:
            normalised.setdefault(re.sub(r"\s+", "", c).lower(), []).append(c)
        clash = [v for v in normalised.values() if len(v) > 1]
        if clash:
            raise UserError(f"{csv_path}: labels {clash[0]} in column {label_column!r} differ only "
                            "by case or spaces; make them identical or declare --classes")
        if len(classes) > MAX_INFERRED_CLASSES:
            raise UserError(f"{csv_path}: column {label_column!r} has {len(classes)} different "
                            "labels; is it a continuous value or the wrong column? Pass "
                            "--label-column, or --classes to declare the classes")
    if len(classes) < 2:
        raise UserError(f"{csv_path}: only one class ({list(classes)}) in column "
                        f"{label_column!r}; classification needs at least two")
    present = {r.label for r in rows}
    absent = [c for c in classes if c not in present]
    if absent:
        raise UserError(f"{csv_path}: declared class(es) {absent} have no rows; remove them from "
                        "--classes or add their subjects")
    return classes


def _check_subjects(csv_path: Path, rows: list[CaseRow]) -> None:
    first: dict[str, CaseRow] = {}
    seen_images: dict[object, tuple[Path, CaseRow]] = {}
    for r in rows:
        prev = first.setdefault(r.subject, r)
        if prev.label != r.label:
            raise UserError(
                f"{csv_path}: subject {r.subject!r} has label {prev.label!r} on line {prev.line} "
                f"but {r.label!r} on line {r.line}; a subject must have one label (fix the "
                "label, or give different scans different subject ids if they are different "
                "subjects)")
        for image in r.images:
            # one file under another name (absolute path with '..', symlink, hard link) is one file
            dup_image, dup = seen_images.setdefault(_file_key(image), (image, r))
            if dup is r:
                continue
            if dup.subject == r.subject:
                raise UserError(f"{csv_path}: line {r.line} repeats image {image} of line "
                                f"{dup.line}; remove the duplicate row")
            same = "" if dup_image == image else f" (as {dup_image}; the same file)"
            raise UserError(f"{csv_path}: image {image} belongs to subject {dup.subject!r} on "
                            f"line {dup.line}{same} and to subject {r.subject!r} on line {r.line}; an "
                            "image must belong to one subject (it would leak between folds)")


def _file_key(path: Path):
    """Identity of a file: (device, inode) if it exists, else its resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))
