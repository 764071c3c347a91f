"""BraTS 2023 layout -> nnU-Net v2 raw dataset, with the nnMamba paper's 70/10/20 split.

The paper (Sec. 3.2) splits the official BraTS 2023 GLI training set into training,
validation and test sets 7:1:2 and trains with nnU-Net. :func:`convert_brats` does that
reproducibly:

1. Every case is validated before anything is written (all five files present, no extra
   file, readable, 3D scalar images on one voxel grid, no NaN voxel, labels in 0-3); all
   problems of all cases are reported together, each naming the case, the file and the fix.
2. The sorted case list is permuted with ``numpy.random.RandomState(seed)`` (a stream that
   NumPy keeps stable across versions) and cut into train / val / test
   (``round(0.1 n)`` val, ``round(0.2 n)`` test, the rest train; halves round up).
3. ``Dataset<ID>_<NAME>/`` is written into ``$nnUNet_raw``: ``imagesTr`` / ``labelsTr`` hold
   train + val, ``imagesTs`` / ``labelsTs`` the held-out test cases; channels
   ``_0000.._0003`` are t1n, t1c, t2w, t2f (:data:`~.layout.CHANNEL_ORDER`); files are
   symlinks to the source (or copies); ``dataset.json`` declares region-based training on
   WT, TC, ET with ``regions_class_order`` (2, 1, 3), so predictions come back as the
   native labels 0-3.
4. ``splits_final.json``: folds 0-4 are a 5-fold cross-validation over train + val; fold 5 is
   the paper's own split (train -> val), so ``nnUNetv2_train ... 5`` trains exactly the
   paper's protocol. It is written into the raw dataset (nnU-Net's planner copies it from
   there) and into ``$nnUNet_preprocessed/Dataset<ID>_<NAME>/``; ``split.json`` records the
   seed, fractions and lists.

The dataset is assembled in a hidden temporary folder next to the target and renamed into
place at the end, so a failure never leaves a half-written dataset behind.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..imaging import ImageError, is_symlink_loop, read_image
from ..nnunet.folders import check_dataset_id_free, env_folder
from ..nnunet.folders import dataset_name as nnunet_dataset_name
from ..safe_io import remove_stale, write_json
from .layout import (
    CHANNEL_ORDER,
    FILE_ENDING,
    MODALITIES,
    NNUNET_REGION_LABELS,
    REGIONS_CLASS_ORDER,
    SEG,
    expected_files,
    is_case_id,
)

#: The paper's split fractions (Sec. 3.2: "7:1:2").
PAPER_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
DEFAULT_SEED = 12345
#: Name of the converted dataset (``Dataset<ID>_BraTS2023GLI``) unless one is given.
DEFAULT_NAME = "BraTS2023GLI"
N_FOLDS = 5
#: Index of the extra entry of splits_final.json holding the paper's train -> val split.
PAPER_FOLD = N_FOLDS

_SPACING_TOL = 1e-4   # mm
_ORIGIN_TOL = 1e-3    # mm
_DIRECTION_TOL = 1e-5
_GRID_FIX = ("all five files of a case must share one voxel grid (BraTS ships them co-registered on "
             "240x240x155 at 1 mm): re-export or resample this file onto the grid of {ref}")


@dataclass(frozen=True)
class CaseProblem:
    """One thing wrong with one case: the case, the file, what is wrong, and the fix."""

    case: str
    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.case}: {self.file}: {self.problem} -- fix: {self.fix}"


class InvalidBratsDataError(UserError):
    """The source folder holds invalid cases; ``problems`` lists every :class:`CaseProblem`."""

    def __init__(self, src, problems, n_cases: int):
        self.problems = list(problems)
        bad = sorted({p.case for p in self.problems})
        lines = [f"{len(bad)} of {n_cases} case folder(s) in {src} are not valid BraTS 2023 cases "
                 f"({len(self.problems)} problem(s)); nothing was written:"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- validation

def find_case_folders(src: str | Path) -> tuple[list[Path], list[CaseProblem]]:
    """Case folders (``BraTS-XXX-NNNNN-NNN``) of ``src``, sorted, and problems with other folders.

    Hidden entries and plain files at the top level are ignored; a folder whose name is not
    a BraTS case name is reported (it may be a mis-named case).
    """
    src = Path(src)
    if not src.is_dir():
        what = "is a symlink loop" if is_symlink_loop(src) else "is not a folder"
        raise UserError(f"{src} {what}; pass the folder holding the BraTS-GLI-XXXXX-XXX case folders")
    cases, problems = [], []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError as e:  # a symlink loop
            problems.append(CaseProblem(entry.name, entry.path, f"cannot be opened ({e.strerror})",
                                        f"replace the link by the case folder or remove it from {src}"))
            continue
        if not is_dir:
            if entry.is_symlink() and is_case_id(entry.name):
                problems.append(CaseProblem(entry.name, entry.path, "dangling symlink",
                                            f"point the link at the case folder or remove it from {src}"))
            continue
        if is_case_id(entry.name):
            cases.append(Path(entry.path))
        else:
            problems.append(CaseProblem(entry.name, entry.path, "folder name is not a BraTS case name "
                                        "(BraTS-GLI-XXXXX-XXX)", "rename it to its case name or move it out of "
                                        f"{src}"))
    if not cases:
        inner = [p for p in src.iterdir() if p.is_dir() and any(is_case_id(q.name) for q in p.iterdir()
                                                                 if q.is_dir())]
        hint = f"; did you mean {inner[0]}?" if inner else ""
        raise UserError(f"no BraTS case folders (BraTS-GLI-XXXXX-XXX/) in {src}{hint}")
    return cases, problems


def _geometry(image):
    return {"size": tuple(image.GetSize()), "spacing": tuple(image.GetSpacing()),
            "origin": tuple(image.GetOrigin()), "direction": tuple(image.GetDirection())}


def geometry_differences(geom, ref) -> list[str]:
    """Human-readable differences between two geometries (dicts from :func:`_geometry`)."""
    out = []
    if geom["size"] != ref["size"]:
        out.append(f"size {geom['size']} differs from {ref['size']}")
    for key, tol in (("spacing", _SPACING_TOL), ("origin", _ORIGIN_TOL), ("direction", _DIRECTION_TOL)):
        a, b = np.asarray(geom[key]), np.asarray(ref[key])
        if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=tol):
            fmt = lambda v: "(" + ", ".join(f"{x:g}" for x in v) + ")"  # noqa: E731
            out.append(f"{key} {fmt(a)} differs from {fmt(b)}")
    return out


def validate_case(case_dir: str | Path) -> list[CaseProblem]:
    """All problems of one BraTS case folder (an empty list for a valid case).

    Every file is read with :func:`nnunet_mamba.imaging.read_image`, which refuses truncated
    files (ITK would zero-fill them), NaN/inf voxels and non-3D data.
    """
    import SimpleITK as sitk

    case_dir = Path(case_dir)
    case = case_dir.name
    expected = expected_files(case)
    present = {e.name for e in os.scandir(case_dir) if not e.name.startswith(".")}
    problems = []
    for name in sorted(present - set(expected.values())):
        problems.append(CaseProblem(case, str(case_dir / name), "unexpected file in the case folder (a case holds "
                                    "exactly the four modalities t1c, t1n, t2f, t2w and the seg)",
                                    "move it out of the case folder (or rename it if it is a mis-named modality)"))
    images = {}
    for suffix, name in expected.items():
        path = case_dir / name
        what = "segmentation" if suffix == SEG else f"{MODALITIES[suffix]} image"
        if name not in present:
            problems.append(CaseProblem(case, str(path), f"missing ({what})",
                                        f"add {name} or leave case {case} out of the source folder"))
            continue
        try:
            image = read_image(path)
        except ImageError as e:
            fix = {"nonfinite": "re-export the segmentation with integer labels 0-3 only" if suffix == SEG else e.fix,
                   "not-3d": "replace it with the 3D volume from the BraTS release", "missing": e.fix}.get(
                e.kind, "re-download / re-extract the file (it is corrupt, incomplete or not NIfTI)")
            problems.append(CaseProblem(case, str(path), e.problem, fix))
            continue
        images[suffix] = image

    ref_suffix = SEG if SEG in images else next(iter(images), None)
    if ref_suffix is not None:
        ref_geom = _geometry(images[ref_suffix])
        ref_name = expected[ref_suffix]
        for suffix, image in images.items():
            if suffix == ref_suffix:
                continue
            diffs = geometry_differences(_geometry(image), ref_geom)
            if diffs:
                problems.append(CaseProblem(case, str(case_dir / expected[suffix]),
                                            "; ".join(d.replace("differs from", f"differs from {ref_name}'s")
                                                      for d in diffs), _GRID_FIX.format(ref=ref_name)))

    for suffix, image in images.items():
        path = str(case_dir / expected[suffix])
        array = sitk.GetArrayViewFromImage(image)
        floating = np.issubdtype(array.dtype, np.floating)
        if suffix != SEG:
            continue
        if floating and not np.array_equal(array, np.round(array)):
            problems.append(CaseProblem(case, path, "non-integer label values",
                                        "re-export the segmentation with integer labels 0-3 only"))
            continue
        if array.min() < 0 or array.max() > 3:
            bad = np.unique(array[(array < 0) | (array > 3)])
            shown = ", ".join(f"{v:g}" for v in bad[:10].astype(float))
            fix = "BraTS 2023 labels are 0-3 (0 background, 1 NCR, 2 ED, 3 ET)"
            if 4 in bad:
                fix += "; a BraTS 2021-style seg uses 4 for ET: map 4 -> 3"
            problems.append(CaseProblem(case, path, f"label(s) {shown} outside 0-3", fix))
    return problems


def validate_source(src: str | Path, n_jobs: int = 1) -> list[str]:
    """Validate every case of a BraTS-layout folder; returns the sorted case names.

    Raises :class:`InvalidBratsDataError` listing every problem of every case.
    """
    case_dirs, problems = find_case_folders(src)
    n_folders = len(case_dirs) + len(problems)  # each mis-named folder gave one problem
    if n_jobs > 1 and len(case_dirs) > 1:
        with ProcessPoolExecutor(max_workers=min(n_jobs, len(case_dirs))) as pool:
            per_case = list(pool.map(validate_case, case_dirs, chunksize=4))
    else:
        per_case = [validate_case(d) for d in case_dirs]
    for p in per_case:
        problems.extend(p)
    if problems:
        raise InvalidBratsDataError(src, problems, n_folders)
    return [d.name for d in case_dirs]


# ----------------------------------------------------------------------------- split

@dataclass(frozen=True)
class DatasetSplit:
    """The paper's train / val / test split of a case list (each list sorted)."""

    seed: int
    train: tuple
    val: tuple
    test: tuple
    fractions: dict = field(default_factory=lambda: dict(PAPER_FRACTIONS))

    def as_dict(self) -> dict:
        return {"seed": self.seed, "fractions": dict(self.fractions),
                "counts": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
                "train": list(self.train), "val": list(self.val), "test": list(self.test)}


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_cases(case_ids, seed: int = DEFAULT_SEED, fractions=None) -> DatasetSplit:
    """Shuffle the sorted case list with ``RandomState(seed)`` and cut it into train / val / test.

    ``n_test = round(f_test * n)``, ``n_val = round(f_val * n)`` (halves up), train gets the
    rest; train + val must hold at least :data:`N_FOLDS` cases for the cross-validation.
    """
    fractions = dict(PAPER_FRACTIONS if fractions is None else fractions)
    ids = sorted(set(case_ids))
    if len(ids) != len(list(case_ids)):
        raise UserError("duplicate case names in the case list")
    n = len(ids)
    n_test = _round_half_up(fractions["test"] * n)
    n_val = _round_half_up(fractions["val"] * n)
    n_train = n - n_val - n_test
    if n_test < 1 or n_val < 1 or n_train < 1 or n_train + n_val < N_FOLDS:
        raise UserError(f"{n} case(s) are too few for a {fractions['train']:g}/{fractions['val']:g}/"
                        f"{fractions['test']:g} split with a {N_FOLDS}-fold cross-validation over train + val "
                        f"(got {n_train}/{n_val}/{n_test}); provide at least 6 cases")
    order = np.random.RandomState(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    return DatasetSplit(seed=seed, train=tuple(sorted(shuffled[:n_train])),
                        val=tuple(sorted(shuffled[n_train:n_train + n_val])),
                        test=tuple(sorted(shuffled[n_train + n_val:])), fractions=fractions)


def cross_validation_folds(case_ids, seed: int = DEFAULT_SEED, n_folds: int = N_FOLDS) -> list[dict]:
    """``n_folds`` folds in nnU-Net's ``splits_final.json`` format over ``case_ids``: the
    shared seeded k-fold split (:func:`nnunet_mamba.runkit.splits.kfold_split`) with
    ``RandomState(seed)``, the generator BraTS splits were always made with (the sorted list
    permuted, cut by ``numpy.array_split``; the validation sets partition the cases).
    """
    from ..runkit.splits import kfold_split

    return kfold_split(case_ids, n_folds, seed, generator="mt19937")


def nnunet_splits(split: DatasetSplit) -> list[dict]:
    """``splits_final.json`` content: folds 0-4 CV over train + val, fold 5 the paper's train -> val."""
    folds = cross_validation_folds(split.train + split.val, split.seed)
    folds.append({"train": list(split.train), "val": list(split.val)})
    return folds


# ----------------------------------------------------------------------------- writing

def dataset_json(n_training: int, name: str) -> dict:
    """nnU-Net v2 ``dataset.json`` for region-based BraTS training."""
    return {
        "channel_names": {str(i): m for i, m in enumerate(CHANNEL_ORDER)},
        "labels": dict(NNUNET_REGION_LABELS),
        "regions_class_order": list(REGIONS_CLASS_ORDER),
        "numTraining": n_training,
        "file_ending": FILE_ENDING,
        "name": name,
        "description": ("BraTS 2023 adult glioma (GLI) training set converted by nnunet-mamba "
                        "(nnmamba brats2023 convert). Channels: " +
                        ", ".join(f"{i}={m} ({MODALITIES[m]})" for i, m in enumerate(CHANNEL_ORDER)) +
                        ". Region-based labels WT, TC, ET; imagesTr holds train + val, imagesTs/labelsTs the "
                        "held-out test cases of the 70/10/20 split recorded in split.json."),
    }


def _place(src: Path, dst: Path, mode: str) -> str:
    """Symlink (mode 'link') or copy src to dst; returns what was done ('symlink' or 'copy')."""
    if mode == "link":
        try:
            os.symlink(os.path.realpath(src), dst)
            return "symlink"
        except (OSError, NotImplementedError):
            pass
    shutil.copy2(src, dst)
    return "copy"


def _write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _derived_data(pre_dataset: Path) -> list[str]:
    """Entries of ``$nnUNet_preprocessed/<dataset>`` made from raw data (all but splits_final.json)."""
    if not pre_dataset.is_dir():
        return []
    return sorted(p.name for p in pre_dataset.iterdir() if p.name != "splits_final.json")


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_brats` wrote."""

    dataset_dir: Path
    preprocessed_splits: Path
    split: DatasetSplit
    files: str  # 'symlink', 'copy', or 'copy (symlinks failed)'

    @property
    def dataset_name(self) -> str:
        return self.dataset_dir.name


def convert_brats(src: str | Path, dataset_id: int, name: str = DEFAULT_NAME, mode: str = "link",
                  seed: int = DEFAULT_SEED, nnunet_raw=None, nnunet_preprocessed=None, overwrite: bool = False,
                  n_jobs: int = 1, verbose: bool = False) -> ConversionResult:
    """Convert a BraTS 2023 folder into ``<nnunet_raw>/Dataset<ID>_<name>`` (see the module doc).

    Args:
        src: folder holding the ``BraTS-GLI-XXXXX-XXX/`` case folders.
        dataset_id: nnU-Net dataset ID (1-999).
        name: dataset name (letters, digits, '-', '_').
        mode: 'link' (symlinks, falling back to copies where impossible) or 'copy'.
        seed: seed of the split (recorded in split.json).
        nnunet_raw / nnunet_preprocessed: default ``$nnUNet_raw`` / ``$nnUNet_preprocessed``.
        overwrite: replace an existing dataset of the same name and remove what nnU-Net derived from
            it in ``$nnUNet_preprocessed/<dataset>`` (plans, preprocessed data, gt_segmentations);
            refused while ``$nnUNet_results/<dataset>`` holds trained models.
        n_jobs: processes for validation.

    Raises:
        InvalidBratsDataError: some case is invalid (nothing is written).
        UserError: bad arguments, existing dataset, ID clash.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise UserError(f"dataset ID must be in 1-999, got {dataset_id}")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise UserError(f"dataset name {name!r} may hold only letters, digits, '-' and '_'")
    if mode not in ("link", "copy"):
        raise ValueError(f"mode must be 'link' or 'copy', got {mode!r}")
    raw = env_folder("nnUNet_raw", nnunet_raw, "--nnunet-raw")
    preprocessed = env_folder("nnUNet_preprocessed", nnunet_preprocessed, "--nnunet-preprocessed")
    dataset_name = nnunet_dataset_name(dataset_id, name)
    target = raw / dataset_name
    for folder, what in ((raw, "nnUNet_raw"), (preprocessed, "nnUNet_preprocessed"),
                         (Path(os.environ["nnUNet_results"]) if os.environ.get("nnUNet_results") else None,
                          "nnUNet_results")):
        check_dataset_id_free(folder, int(dataset_id), dataset_name, what)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it")
    src = Path(src)
    pre_dataset = preprocessed / dataset_name
    for folder in (target, pre_dataset):
        real_src, real_folder = os.path.realpath(src), os.path.realpath(folder)
        if os.path.commonpath([real_src, real_folder]) == real_folder:
            raise UserError(f"the source {src} lies in {folder}, which convert writes (and with --overwrite "
                            "removes); pass the original BraTS folder as SRC")
    stale = _derived_data(pre_dataset)
    if stale and not overwrite:
        raise UserError(f"{pre_dataset} holds {stale[0]} from an earlier conversion (nnU-Net plans / "
                        "preprocessed data made from other raw data would be used silently); pass --overwrite "
                        f"to remove them, or remove {pre_dataset}")
    results_root = os.environ.get("nnUNet_results")
    trained = Path(results_root) / dataset_name if results_root else None
    if overwrite and trained is not None and trained.is_dir() and any(trained.iterdir()):
        raise UserError(f"{trained} holds models trained on the dataset that --overwrite would replace; they "
                        "would be reused as if trained on the new data. Move or remove that folder first")
    for folder in (raw, preprocessed):
        remove_stale(folder)  # .Dataset*.incomplete-<pid> / .old-<pid> of killed runs

    case_ids = validate_source(src, n_jobs=n_jobs)
    split = split_cases(case_ids, seed)
    splits = nnunet_splits(split)

    pre_splits = preprocessed / dataset_name / "splits_final.json"
    if pre_splits.exists() and not overwrite:
        try:
            same = json.loads(pre_splits.read_text()) == splits
        except (OSError, ValueError):
            same = False
        if not same:
            raise UserError(f"{pre_splits} already exists with a different split (left from an earlier "
                            f"dataset?); nnU-Net's planner would refuse it. Pass --overwrite to replace it, "
                            f"or remove {pre_splits.parent}")

    raw.mkdir(parents=True, exist_ok=True)
    tmp = raw / f".{dataset_name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    done = set()
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir(parents=True)
        todo = [(c, "Tr") for c in split.train + split.val] + [(c, "Ts") for c in split.test]
        for i, (case, part) in enumerate(sorted(todo)):
            files = expected_files(case)
            for channel, modality in enumerate(CHANNEL_ORDER):
                done.add(_place(src / case / files[modality],
                                tmp / f"images{part}" / f"{case}_{channel:04d}{FILE_ENDING}", mode))
            done.add(_place(src / case / files[SEG], tmp / f"labels{part}" / f"{case}{FILE_ENDING}", mode))
            if verbose and (i + 1) % max(1, len(todo) // 10) == 0:
                print(f"  {i + 1}/{len(todo)} cases placed", flush=True)
        if done == {"symlink"}:
            files_mode = "symlink"
        elif mode == "copy":
            files_mode = "copy"
        else:
            files_mode = "copy (symlinks failed)" if done == {"copy"} else "symlink, some copies (symlinks failed)"
        _write_json(tmp / "dataset.json", dataset_json(len(split.train) + len(split.val), name))
        _write_json(tmp / "splits_final.json", splits)
        record = {
            "created_by": "nnmamba brats2023 convert (nnunet-mamba)",
            "source": str(src.resolve()),
            **split.as_dict(),
            "method": ("sorted case names permuted by numpy.random.RandomState(seed).permutation; train = first "
                       "n_train, val = next n_val, test = the rest; n_test = round(0.2 n), n_val = round(0.1 n), "
                       "halves rounded up"),
            "splits_final": (f"folds 0-{N_FOLDS - 1}: {N_FOLDS}-fold cross-validation over train + val (sorted, "
                             "permuted by RandomState(seed), numpy.array_split); fold "
                             f"{PAPER_FOLD}: the paper's split, train -> val"),
            "channels": {f"_{i:04d}": m for i, m in enumerate(CHANNEL_ORDER)},
            "files": files_mode,
        }
        _write_json(tmp / "split.json", record)
        if overwrite and pre_dataset.exists():  # plans, preprocessed data, gt_segmentations of the old data
            old_pre = preprocessed / f".{dataset_name}.old-{os.getpid()}"
            os.rename(pre_dataset, old_pre)
            shutil.rmtree(old_pre, ignore_errors=True)
        if target.exists():  # overwrite: swap in, then drop the old one
            old = raw / f".{dataset_name}.old-{os.getpid()}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    pre_splits.parent.mkdir(parents=True, exist_ok=True)
    write_json(pre_splits, splits, overwrite=True)  # temporary file + rename
    return ConversionResult(dataset_dir=target, preprocessed_splits=pre_splits, split=split, files=files_mode)
