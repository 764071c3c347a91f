"""``nnmamba demo``: the whole nnU-Net workflow with nnMambaTrainer on a small synthetic set.

It writes a synthetic 3D dataset in nnU-Net's raw format (a bright sphere and a dark box
in noise), then runs the real nnU-Net commands -- ``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_train ... -tr nnMambaTrainer_demo -device cpu``, ``nnUNetv2_predict`` -- with
nnU-Net's per-epoch loss, pseudo Dice and epoch time shown while it trains, and ends with
the Dice of the held-out predictions, a PNG (image | reference | prediction) and the path
of nnU-Net's own ``progress.png``. Everything lives under ``--workdir``; the full output of
the nnU-Net commands is in ``WORKDIR/nnunet.log``.

Why the data look as they do: both classes have similar volumes (a box of 9-12 voxels a
side, a sphere of radius 5-6.5 voxels, never touching) and equal contrast of opposite sign.
With a small box of weaker contrast than the sphere (the first version of this demo) the
96 iterations of the demo trainer only ever learned the sphere.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError
from .nnunet.commands import nnunet_env, run_command
from .nnunet.folders import dataset_glob, dataset_name
from .nnunet.trainers import find_trainer

LABELS = {"background": 0, "sphere": 1, "box": 2}


def _place(rng, shape, half, taken=None, gap=2.0, tries=50):
    """A centre keeping ``half`` voxels (per axis) inside ``shape`` and, when ``taken`` =
    (centre, half) is given, separated from that object by ``gap`` voxels along some axis;
    None if ``tries`` random centres all fail."""
    for _ in range(tries):
        c = np.array([rng.uniform(h + 1, s - h - 2) for s, h in zip(shape, half)])
        if taken is None or np.any(np.abs(c - taken[0]) > np.asarray(half) + taken[1] + gap):
            return c
    return None


def make_case(rng, shape=(32, 32, 32), contrast: float = 3.0):
    """(image float32, labels uint8) of one case: label 1 a sphere (brighter than the
    background by ``contrast`` noise SDs), label 2 an axis-aligned box (darker by the same)."""
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r = rng.uniform(5.0, 6.5)
    ext = rng.integers(9, 13, size=3)
    box_c = None
    while box_c is None:  # a sphere near the centre may leave no room: place both again
        sphere_c = _place(rng, shape, [r] * 3)
        box_c = _place(rng, shape, ext / 2.0, (sphere_c, np.full(3, r)))
    box_lo = np.round(box_c - ext / 2.0).astype(int)
    seg = np.zeros(shape, np.uint8)
    seg[(zz - sphere_c[0]) ** 2 + (yy - sphere_c[1]) ** 2 + (xx - sphere_c[2]) ** 2 <= r * r] = 1
    seg[tuple(slice(lo, lo + e) for lo, e in zip(box_lo, ext))] = 2
    img = rng.normal(0.0, 1.0, shape) + contrast * (seg == 1) - contrast * (seg == 2)
    return img.astype(np.float32), seg


def make_synthetic_dataset(raw_root: Path, dataset_id: int = 901, name: str = "NNMambaDemo",
                           num_train: int = 8, num_test: int = 2, shape=(32, 32, 32),
                           spacing=(1.0, 1.0, 1.0), seed: int = 0) -> Path:
    """Write ``DatasetXXX_name`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json).

    One MR-like channel of ``shape`` (z, y, x) voxels; labels in :data:`LABELS` (see
    :func:`make_case`). Returns the dataset folder (replaced if it exists).
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    folder = Path(raw_root) / dataset_name(dataset_id, name)
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    for i in range(num_train + num_test):
        img, seg = make_case(rng, tuple(shape))
        split, case = ("Tr" if i < num_train else "Ts"), f"demo_{i:03d}"
        for arr, path in ((img, folder / f"images{split}" / f"{case}_0000.nii.gz"),
                          (seg, folder / f"labels{split}" / f"{case}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(tuple(float(s) for s in reversed(spacing)))
            sitk.WriteImage(im, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": num_train,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "synthetic demo data of nnunet-mamba (bright sphere, dark box, noise)",
    }, indent=2))
    return folder


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels) -> dict[int, float]:
    out = {}
    for lab in labels:
        p, r = pred == lab, ref == lab
        denom = p.sum() + r.sum()
        out[lab] = float(2 * (p & r).sum() / denom) if denom else 1.0
    return out


class EpochReporter:
    """Turns nnU-Net's training output into one line per epoch (a callable per line)::

        epoch  3/8  train_loss -0.412  val_loss -0.530  pseudo Dice 0.91 0.62   9.8 s
    """

    _patterns = {
        "epoch": re.compile(r":\s*Epoch (\d+)\s*$"),
        "train": re.compile(r"train_loss\s+(\S+)"),
        "val": re.compile(r"val_loss\s+(\S+)"),
        "dice": re.compile(r"Pseudo dice\s+\[(.*)\]"),
        "time": re.compile(r"Epoch time:\s*([\d.]+)\s*s"),
    }
    _timestamp = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+:\s*")

    def __init__(self, num_epochs: Optional[int] = None, out=print):
        self.num_epochs, self.out, self.state, self.epochs_seen = num_epochs, out, {}, 0

    def __call__(self, line: str) -> None:
        for key, pat in self._patterns.items():
            m = pat.search(line)
            if m:
                self.state[key] = m.group(1)
                if key == "time":
                    self._emit()
                return
        if any(k in line for k in ("Mean Validation Dice", "Using device", "Training done")):
            self.out("  " + self._timestamp.sub("", line).strip())

    def _emit(self) -> None:
        s, total = self.state, f"/{self.num_epochs}" if self.num_epochs else ""
        epoch = int(s.get("epoch", self.epochs_seen)) + 1
        # nnU-Net prints e.g. [np.float32(0.91), np.float32(0.62)] or [0.91, 0.62]
        values = re.sub(r"np\.\w+\(|\)", "", s.get("dice", "")).split(",")
        dice = " ".join(f"{float(v):.2f}" for v in values if v.strip())
        self.out(f"  epoch {epoch:>2}{total}  train_loss {float(s.get('train', 'nan')):+.3f}  "
                 f"val_loss {float(s.get('val', 'nan')):+.3f}  pseudo Dice {dice or '-'}  "
                 f"{float(s['time']):5.1f} s")
        self.epochs_seen += 1
        self.state = {}


def _best_slice(ref: np.ndarray) -> tuple[int, int]:
    """(axis, index) of the slice showing every label of ``ref`` with the most labelled
    voxels (axial first); failing that, the slice with most voxels of the rarest label."""
    labels = [lab for lab in np.unique(ref) if lab != 0]
    best = None
    for axis in range(3):
        moved = np.moveaxis(ref, axis, 0)
        for k in range(moved.shape[0]):
            if all((moved[k] == lab).any() for lab in labels):
                score = int((moved[k] != 0).sum())
                if best is None or score > best[0]:
                    best = (score, axis, k)
    if best is not None:
        return best[1], best[2]
    rarest = min(labels, key=lambda lab: (ref == lab).sum())
    return 0, int(np.argmax((ref == rarest).reshape(ref.shape[0], -1).sum(1)))


def save_overview_png(path: Path, image: np.ndarray, ref: np.ndarray, pred: np.ndarray,
                      title: str = "") -> tuple[int, int]:
    """A PNG of one slice: image | reference | prediction (labels in colour).

    Uses matplotlib's Agg canvas directly, so the global backend is left alone. The slice
    is chosen by :func:`_best_slice`; returns its (axis, index) in the (z, y, x) arrays.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    axis, k = _best_slice(ref)
    cut = lambda a: np.take(a, k, axis=axis)  # noqa: E731
    cmap = ListedColormap([(0, 0, 0, 0), (0.95, 0.35, 0.2, 0.75), (0.2, 0.6, 1.0, 0.75),
                           (0.3, 0.9, 0.3, 0.75)])
    fig = Figure(figsize=(9, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (name, lab) in zip(axes, (("image", None), ("reference", ref), ("prediction", pred))):
        ax.imshow(cut(image), cmap="gray", interpolation="nearest")
        if lab is not None:
            ax.imshow(cut(lab), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    fig.suptitle(f"{title}\n{'zyx'[axis]} = {k}" if title else f"{'zyx'[axis]} = {k}")
    fig.tight_layout()
    fig.savefig(str(path))
    return axis, k


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="nnmamba_demo", help="where data and results go")
    parser.add_argument("--trainer", default="nnMambaTrainer_demo",
                        help="trainer to run (default: nnMambaTrainer_demo, 8 short epochs)")
    parser.add_argument("--dataset-id", type=int, default=901)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", type=int, default=8, help="training cases (default 8)")
    parser.add_argument("--test-cases", type=int, default=2, help="held-out cases (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--verbose", action="store_true",
                        help="show nnU-Net's full output instead of one line per epoch")


def run(args) -> int:
    from .imaging import read_array

    if args.cases < 2:
        raise UserError(f"--cases {args.cases}: nnU-Net needs at least 2 training cases.")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: this PyTorch sees no CUDA GPU "
                            f"(torch {torch.__version__}). Use --device cpu or a CUDA build.")
    t_start = time.time()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(workdir)
    found, epochs = find_trainer(args.trainer, env)
    if not found:
        raise UserError(f"--trainer {args.trainer}: nnU-Net finds no trainer class of that name. "
                        "Check the spelling (e.g. nnMambaTrainer_demo) and that nnunet-mamba is "
                        "installed in this environment.")
    folder = make_synthetic_dataset(workdir / "nnUNet_raw", args.dataset_id, num_train=args.cases,
                                    num_test=args.test_cases, seed=args.seed)
    print(f"synthetic dataset: {folder} ({args.cases} training, {args.test_cases} held-out cases)")
    d = str(args.dataset_id)
    log_path = workdir / "nnunet.log"
    pred = workdir / "predictions"
    if pred.exists():
        shutil.rmtree(pred)
    verbose = getattr(args, "verbose", False)
    with open(log_path, "w") as log:
        echo = (lambda line: print("  " + line, flush=True)) if verbose else None
        run_command(["nnUNetv2_plan_and_preprocess", "-d", d, "-c", "3d_fullres", "-np", "2",
                     "-npfp", "2", "--verify_dataset_integrity"], env, log, echo)
        print(f"training {args.trainer} on {args.device} ({epochs or '?'} epochs; full log {log_path})",
              flush=True)
        run_command(["nnUNetv2_train", d, "3d_fullres", "0", "-tr", args.trainer,
                     "-device", args.device], env, log,
                    echo or EpochReporter(epochs, lambda s: print(s, flush=True)))
        run_command(["nnUNetv2_predict", "-i", str(folder / "imagesTs"), "-o", str(pred),
                     "-d", d, "-c", "3d_fullres", "-f", "0", "-tr", args.trainer,
                     "-device", args.device, "-npp", "1", "-nps", "1"], env, log, echo)
    names = [n for n, v in sorted(LABELS.items(), key=lambda kv: kv[1]) if v]
    print(f"\nheld-out Dice ({', '.join(names)}):")
    rows, first = {}, None
    for ref_path in sorted((folder / "labelsTs").glob("*.nii.gz")):
        pred_path = pred / ref_path.name
        if not pred_path.exists():
            raise UserError(f"no prediction {pred_path} for {ref_path.name}; see {log_path}")
        p, _ = read_array(pred_path)  # the one image reader (refuses truncated / NaN files)
        r, _ = read_array(ref_path)
        dice = dice_per_label(p, r, range(1, len(names) + 1))
        rows[ref_path.name] = {n: dice[i] for i, n in enumerate(names, 1)}
        print(f"  {ref_path.name:<18}" + "  ".join(f"{n} {dice[i]:.3f}" for i, n in enumerate(names, 1)))
        if first is None:
            first = (ref_path, p, r)
    mean = {n: float(np.mean([row[n] for row in rows.values()])) for n in names}
    print(f"  {'mean':<18}" + "  ".join(f"{n} {mean[n]:.3f}" for n in names))
    png = workdir / "demo_prediction.png"
    ref_path, p, r = first
    case = ref_path.name[: -len(".nii.gz")]
    img, _ = read_array(folder / "imagesTs" / f"{case}_0000.nii.gz")
    save_overview_png(png, img, r, p, f"{case}: " + ", ".join(
        f"{n} Dice {rows[ref_path.name][n]:.2f}" for n in names) + " (red sphere, blue box)")
    results = workdir / "nnUNet_results"
    progress = sorted(results.glob(f"{dataset_glob(args.dataset_id)}/{args.trainer}__*/fold_0/progress.png"))
    (workdir / "summary.json").write_text(json.dumps({
        "trainer": args.trainer, "device": args.device, "epochs": epochs,
        "dice": rows, "mean_dice": mean, "seconds": round(time.time() - t_start, 1)}, indent=2))
    print(f"\npicture of a held-out case: {png}")
    if progress:
        print(f"nnU-Net's training curves:  {progress[0]}")
    print(f"Dice per case as JSON:       {workdir / 'summary.json'}")
    print(f"total time {time.time() - t_start:.0f} s")
    if min(mean.values()) < 0.8:
        print("note: a class stayed below Dice 0.8; more training (a trainer with more "
              "epochs, or more --cases) should reach it.")
    return 0
