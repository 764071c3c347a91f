"""``nnmamba demo``: the synthetic data, the live epoch lines, the picture, and a small end-to-end
run of the demo's own code path that must learn every class."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from nnunet_mamba import demo


def test_every_case_holds_both_classes_of_similar_size_apart():
    rng = np.random.default_rng(0)
    for _ in range(30):
        img, seg = demo.make_case(rng)
        sphere, box = (seg == 1).sum(), (seg == 2).sum()
        assert 400 < sphere < 1300 and 700 < box < 1800, (sphere, box)
        # the box is complete (never overwritten by the sphere): a cuboid of 9-12 voxels a side
        zz, yy, xx = np.nonzero(seg == 2)
        ext = [a.max() - a.min() + 1 for a in (zz, yy, xx)]
        assert all(9 <= e <= 12 for e in ext) and np.prod(ext) == box
        # opposite contrast: the classes differ in the image, not only in shape
        assert img[seg == 1].mean() > 1.5 and img[seg == 2].mean() < -1.5


NNUNET_LINES = """\
2026-12-03 03:04:13.146: Epoch 0
2026-12-03 03:04:13.147: Current learning rate: 0.002
Using device: cpu
2026-12-03 03:04:27.757: train_loss 0.7187
2026-12-03 03:04:27.757: val_loss 2.6289
2026-12-03 03:04:27.758: Pseudo dice [np.float32(0.0245), np.float32(0.1303)]
2026-12-03 03:04:27.758: Epoch time: 85.88 s
2026-12-03 03:04:28.001: Epoch 1
2026-12-03 03:04:29.757: train_loss -0.5
2026-12-03 03:04:29.757: val_loss -0.6
2026-12-03 03:04:29.758: Pseudo dice [0.9, 0.85]
2026-12-03 03:04:29.758: Epoch time: 9.5 s
2026-12-03 03:05:00.000: Mean Validation Dice:  0.87
"""


def test_epoch_reporter_turns_nnunet_output_into_one_line_per_epoch():
    shown = []
    reporter = demo.EpochReporter(8, shown.append)
    for line in NNUNET_LINES.splitlines():
        reporter(line)
    epochs = [s for s in shown if "epoch" in s]
    assert epochs[0].split() == ["epoch", "1/8", "train_loss", "+0.719", "val_loss", "+2.629",
                                 "pseudo", "Dice", "0.02", "0.13", "85.9", "s"]
    assert "2/8" in epochs[1] and "0.90 0.85" in epochs[1]
    assert "Using device: cpu" in shown[0] and shown[-1].strip() == "Mean Validation Dice:  0.87"


def test_overview_png_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib
    backend = matplotlib.get_backend()
    img, seg = demo.make_case(np.random.default_rng(1))
    path = tmp_path / "x.png"
    axis, k = demo.save_overview_png(path, img, seg, seg, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = np.take(seg, k, axis=axis)
    assert (shown == 1).any() and (shown == 2).any()  # the slice shows both classes
    assert matplotlib.get_backend() == backend


# A shorter nnMambaTrainer_demo for CI: nnU-Net finds it through nnUNet_extTrainer, exactly as
# it finds the package's own trainers; it keeps the demo's iterations per epoch.
TEST_TRAINER = '''
from nnunet_mamba_trainers.trainers_nnmamba import nnMambaTrainer_demo


class nnMambaTrainer_demoCI(nnMambaTrainer_demo):
    hyperparameters = {**nnMambaTrainer_demo.hyperparameters, "num_epochs": EPOCHS,
                       "inference_mirroring": False}
'''
EPOCHS = 5
BAR = 0.6


@pytest.mark.slow
def test_the_demo_learns_every_class(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "trainers"
    folder.mkdir()
    (folder / "trainers_demo_ci.py").write_text(TEST_TRAINER.replace("EPOCHS", str(EPOCHS)))
    monkeypatch.setenv("nnUNet_extTrainer", str(folder))
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--workdir", str(tmp_path / "w"), "--trainer", "nnMambaTrainer_demoCI",
                              "--cases", "6", "--test-cases", "1", "--dataset-id", "977"])
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    # live progress: one line per epoch with nnU-Net's losses, pseudo Dice and epoch time
    epoch_lines = [s for s in out.splitlines() if s.strip().startswith("epoch ")]
    assert len(epoch_lines) == EPOCHS and all("pseudo Dice" in s for s in epoch_lines)
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["epochs"] == EPOCHS
    assert all(v > BAR for v in summary["mean_dice"].values()), summary["mean_dice"]
    png = tmp_path / "w" / "demo_prediction.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in out
    assert "progress.png" in out
