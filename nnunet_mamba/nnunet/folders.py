"""nnU-Net's three folders and its dataset folder names.

nnU-Net v2 keeps raw data, preprocessed data and trained models in the folders named by the
environment variables ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``; a
dataset lives in ``Dataset<ID>_<NAME>`` (ID zero-padded to three digits) in each of them,
and one ID may have only one name.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

#: the environment variables of nnU-Net's folders, in the order raw, preprocessed, results
VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def dataset_name(dataset_id: int, name: str) -> str:
    """``Dataset<ID>_<NAME>``, the folder name nnU-Net gives dataset ``dataset_id``."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_glob(dataset_id: int) -> str:
    """Glob pattern of every folder of dataset ``dataset_id``, whatever its name."""
    return dataset_name(dataset_id, "*")


@dataclass(frozen=True)
class NnUNetFolders:
    """nnU-Net's three folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``)."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def in_workdir(cls, work: Path) -> "NnUNetFolders":
        """The three folders inside one work folder (``WORK/nnUNet_raw``, ...)."""
        return cls(*(Path(work) / v for v in VARIABLES))

    @classmethod
    def resolve(cls, work: Path | None, environ=os.environ) -> "NnUNetFolders":
        """Inside ``work`` when given, else from the environment variables (all three needed)."""
        if work is not None:
            return cls.in_workdir(Path(work).resolve())
        missing = [v for v in VARIABLES if not environ.get(v)]
        if missing:
            raise UserError(f"{', '.join(missing)} not set: export nnU-Net's folders (nnUNet_raw, "
                            "nnUNet_preprocessed, nnUNet_results) or pass --work DIR to keep everything in DIR")
        return cls(*(Path(environ[v]).resolve() for v in VARIABLES))

    def as_env(self) -> dict[str, str]:
        """The three environment variables naming these folders."""
        return dict(zip(VARIABLES, map(str, (self.raw, self.preprocessed, self.results))))


def env_folder(variable: str, value=None, option: str | None = None, environ=os.environ) -> Path:
    """``value`` if given, else the folder of the environment variable ``variable``.

    Raises :class:`UserError` when neither is set, naming ``option`` (a command-line option
    that gives the folder) when there is one.
    """
    value = value or environ.get(variable)
    if not value:
        raise UserError(f"no nnU-Net folder: set the environment variable {variable} (as for nnU-Net itself)"
                        + (f" or pass {option} DIR" if option else ""))
    return Path(value)


def find_dataset_folder(dataset: str, variable: str = "nnUNet_preprocessed") -> Path:
    """The folder of ``dataset`` (an ID or ``DatasetXXX_Name``) in ``$<variable>``, found the way
    nnU-Net finds it (by ID across its three folders)."""
    root = env_folder(variable)
    try:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        name = maybe_convert_to_dataset_name(dataset)
    except Exception as e:
        raise UserError(f"dataset {dataset!r} not found: {e}") from None
    return root / name


def check_dataset_id_free(folder: Path, dataset_id: int, target_name: str, what: str) -> None:
    """Raise :class:`UserError` if ``folder`` (nnU-Net's folder ``what``) holds dataset
    ``dataset_id`` under another name than ``target_name`` (nnU-Net needs one name per ID)."""
    if folder is None or not Path(folder).is_dir():
        return
    others = sorted(p.name for p in Path(folder).glob(dataset_glob(dataset_id))
                    if p.name != target_name and p.is_dir())
    if others:
        raise UserError(f"dataset ID {dataset_id} is already used by {Path(folder) / others[0]} ({what}); nnU-Net "
                        f"needs one name per ID: choose another -d or remove that folder")


@contextlib.contextmanager
def environ_set(values: dict):
    """Set environment variables of this process meanwhile (e.g. for code that reads
    ``nnunetv2.paths`` or ``$nnUNet_results``); the old values come back afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
