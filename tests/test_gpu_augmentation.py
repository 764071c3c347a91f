"""GPU augmentation (nnunet_mamba.training.gpu_augmentation*) against nnU-Net's CPU transforms.

- for fixed parameters every batched step gives what the batchgeneratorsv2 transform gives
  (the same parameter dicts, from the transforms' own get_parameters, fed to both);
- over many draws the sampled parameters follow the probabilities and ranges of nnU-Net's
  get_training_transforms (3D, anisotropic 3D with dummy 2D augmentation, 2D, regions);
- the translation refuses what it cannot batch (cascade), and the trainer switch;
- a smoke training through the real ``nnUNetv2_train -device cpu`` with the path forced on.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from scipy import stats

from nnunet_mamba.training import gpu_augmentation_ops as ops
from nnunet_mamba.training.gpu_augmentation import (GPUAugmentation, LabelStep, MirrorStep,
                                                    RandomIntensityStep, SpatialStep,
                                                    UnsupportedTransform)
from nnunet_mamba.training.gpu_augmentation_trainer import gpu_augmentation_setting

ROT3D = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
ROT180 = (-np.pi, np.pi)


def nnunet_transforms(patch, rotation=ROT3D, ds=None, dummy2d=False, regions=None, mask=False,
                      cascaded=False):
    return nnUNetTrainer.get_training_transforms(
        patch, rotation, ds, tuple(range(len(patch))), dummy2d, use_mask_for_norm=[mask, False],
        is_cascaded=cascaded, foreground_labels=[1, 2, 3], regions=regions, ignore_label=None)


def blobs(shape, n_labels=3, seed=0):
    """A smooth random label map (int16) with a -1 border, like nnU-Net's padded crops."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, n_labels, *[max(2, s // 6) for s in shape]), generator=g)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    seg = torch.nn.functional.interpolate(coarse, size=shape, mode=mode).argmax(1).to(torch.int16)
    seg[(slice(None), slice(0, 2))] = -1
    return seg  # (1, *shape)


def image(shape, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((c, *shape), generator=g) * 2 + 1


def step_of(aug, cls, name=None):
    return [s for s in aug.steps if isinstance(s, cls) and (name is None or type(s.t).__name__ == name)]


# ---- fixed parameters: batched step == nnU-Net's transform ----------------------------------
@pytest.mark.parametrize("dim", [2, 3])
def test_spatial_equals_nnunet(dim):
    patch = (20, 24, 18)[:dim]
    initial = (29, 34, 27)[:dim]
    t = copy.deepcopy(nnunet_transforms(patch, ROT180 if dim == 2 else ROT3D).transforms[0])
    t.p_rotation = t.p_scaling = 1.0
    step = SpatialStep(t, False, [0, 1, 2])
    imgs = torch.stack([image(initial, seed=s) for s in range(3)])
    segs = torch.stack([blobs(initial, seed=s) for s in range(3)])
    prms = [t.get_parameters(image=imgs[b]) for b in range(3)]
    prms[1] = {"center_location_in_pixels": [s / 2 for s in initial], "grid": None, "affine": None}
    affines = np.stack([p["affine"] if p["affine"] is not None else np.eye(dim) for p in prms])
    gi, gs = step.apply(imgs.clone(), segs.clone(), {"affines": affines,
                                                     "transformed": np.array([True, False, True])})
    for b in range(3):
        ci = t._apply_to_image(imgs[b], **prms[b])
        cs = t._apply_to_segmentation(segs[b], **prms[b])
        # the grid is summed in another order than nnU-Net's matmul: float rounding only
        torch.testing.assert_close(gi[b], ci, atol=1e-4, rtol=1e-4)
        assert (gs[b] == cs).float().mean() > 0.999, "labels differ beyond isolated ties"
        assert set(gs[b].unique().tolist()) <= {-1, 0, 1, 2}
    assert torch.equal(gs[1], t._apply_to_segmentation(segs[1], **prms[1]))


def test_spatial_pseudo2d_equals_nnunet():
    patch = (6, 20, 22)
    aug = GPUAugmentation.from_nnunet(nnunet_transforms(patch, ROT180, dummy2d=True), [0, 1, 2], 3)
    step = step_of(aug, SpatialStep)[0]
    assert step.pseudo2d and step.patch_size == (20, 22)
    cpu = copy.deepcopy(nnunet_transforms(patch, ROT180, dummy2d=True))
    to2d, sp, to3d = cpu.transforms[:3]
    sp.p_rotation = sp.p_scaling = 1.0
    initial = (6, 31, 30)
    img, seg = image(initial), blobs(initial)
    d = to2d(image=img.clone(), segmentation=seg.clone())
    prm = sp.get_parameters(**d)
    d = to3d(**sp.apply(d, **prm))
    gi, gs = step.apply(img[None].clone(), seg[None].clone(),
                        {"affines": prm["affine"][None], "transformed": np.array([True])})
    torch.testing.assert_close(gi[0], d["image"], atol=1e-4, rtol=1e-4)
    assert (gs[0] == d["segmentation"]).float().mean() > 0.999


def _fixed(t, imgs):
    """nnU-Net's parameters for each sample, and ``t`` made to hand them out in turn."""
    prms = [t.get_parameters(image=im) for im in imgs]
    it = iter(prms)
    t.get_parameters = lambda **kw: next(it)
    return prms


@pytest.mark.parametrize("name", ["GaussianBlurTransform", "MultiplicativeBrightnessTransform",
                                  "ContrastTransform", "SimulateLowResolutionTransform",
                                  "GammaTransform"])
@pytest.mark.parametrize("dim", [2, 3])
def test_intensity_steps_equal_nnunet(name, dim):
    patch = (14, 16, 12)[:dim]
    aug = GPUAugmentation.from_nnunet(nnunet_transforms(patch), [0, 1, 2, 3], dim)
    steps = step_of(aug, RandomIntensityStep, name)
    torch.manual_seed(1)
    np.random.seed(1)
    for s in steps:  # both gamma steps (with and without inversion)
        t = copy.deepcopy(s.t)
        t.benchmark = False  # nnU-Net times fft against direct convolution; same result
        t.p_per_channel = 1.0 if name != "GaussianBlurTransform" else 0.7
        imgs = torch.stack([image(patch, c=3, seed=b) for b in range(4)])
        prms = _fixed(t, imgs)
        step = RandomIntensityStep(t, 1.0, dim)
        gpu, _ = step.apply(imgs.clone(), None, step.sample(4, 3))
        for b in range(4):
            cpu = t._apply_to_image(imgs[b].clone(), **prms[b])
            torch.testing.assert_close(gpu[b], cpu, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dim,pseudo2d", [(2, False), (3, False), (3, True)])
def test_cropping_to_the_needed_box_leaves_the_spatial_result_unchanged(dim, pseudo2d):
    """CroppingLoader sends only SpatialStep.needed_extent of nnU-Net's enlarged patch."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    patch = (20, 24, 18)[:dim] if not pseudo2d else (6, 24, 18)
    rot = ROT180 if dim == 2 or pseudo2d else ROT3D
    plane = patch[1:] if pseudo2d else patch
    initial = tuple(int(i) for i in get_patch_size(plane, rot, rot, rot, (0.85, 1.25)))
    initial = (patch[0],) + initial if pseudo2d else initial
    t = copy.deepcopy(nnunet_transforms(plane, rot).transforms[0])
    step = SpatialStep(t, pseudo2d, [0, 1, 2])
    n, boxes = 6, []
    imgs = torch.stack([image(initial, seed=s) for s in range(n)])
    segs = torch.stack([blobs(initial, seed=s) for s in range(n)])
    np.random.seed(0)
    for p_transform in (0.0, 1.0, 0.3):
        t.p_rotation = t.p_scaling = p_transform
        params = step.sample(n, 2)
        extent = step.needed_extent(params, initial)
        boxes.append(extent)
        box = (slice(None), slice(None)) + ops.center_crop_slices(initial, extent)
        full_i, full_s = step.apply(imgs.clone(), segs.clone(), params)
        cut_i, cut_s = step.apply(imgs[box].clone(), segs[box].clone(), params)
        torch.testing.assert_close(cut_i, full_i, atol=1e-4, rtol=1e-4)
        assert (cut_s == full_s).float().mean() > 0.999, "labels differ beyond isolated ties"
        assert all(e <= i for e, i in zip(extent, initial))
    assert all(0 <= b - p <= 1 for b, p in zip(boxes[0], patch)), "no rotation/scaling: the final patch"
    assert np.prod(boxes[0]) < np.prod(initial)


def test_gaussian_noise_matches_nnunet_parameters():
    patch = (24, 24, 24)
    aug = GPUAugmentation.from_nnunet(nnunet_transforms(patch), [0, 1, 2], 3)
    t = step_of(aug, RandomIntensityStep, "GaussianNoiseTransform")[0].t
    imgs = torch.stack([image(patch, c=2, seed=b) for b in range(3)])
    prms = _fixed(t, imgs)
    step = RandomIntensityStep(t, 1.0, 3)
    out, _ = step.apply(imgs.clone(), None, step.sample(3, 2))
    for b in range(3):
        sig = prms[b]["sigmas"]  # nnU-Net: one std for all channels (synchronize_channels)
        for c in range(2):
            res = out[b, c] - imgs[b, c]
            assert abs(res.mean().item()) < 0.05 * sig + 1e-6
            assert abs(res.std().item() - sig) < 0.05 * sig + 1e-6


def test_mirror_and_label_steps_equal_nnunet():
    patch = (10, 12, 14)
    regions = [(1, 2, 3), (2, 3), (3,)]
    cpu = nnunet_transforms(patch, ds=[[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]],
                            regions=regions, mask=True)
    aug = GPUAugmentation.from_nnunet(cpu, [0, 1, 2, 3], 3)
    img = torch.stack([image(patch, seed=b) for b in range(2)])
    seg = torch.stack([blobs(patch, 4, seed=b) for b in range(2)])
    mirror = step_of(aug, MirrorStep)[0]
    axes = [[0, 2], [1]]
    gi, gs = mirror.apply(img.clone(), seg.clone(), {"axes": axes})
    for b in range(2):
        d = mirror.t.apply({"image": img[b].clone(), "segmentation": seg[b].clone()}, axes=axes[b])
        assert torch.equal(gi[b], d["image"]) and torch.equal(gs[b], d["segmentation"])
    gi, gs = img.clone(), seg.clone()
    for s in step_of(aug, LabelStep):
        gi, gs = s.apply(gi, gs, {})
    assert [type(s.t).__name__ for s in step_of(aug, LabelStep)] == [
        "MaskImageTransform", "RemoveLabelTransform", "ConvertSegmentationToRegionsTransform",
        "DownsampleSegForDSTransform"]
    for b in range(2):
        d = {"image": img[b].clone(), "segmentation": seg[b].clone()}
        for s in step_of(aug, LabelStep):
            d = s.t(**d)
        assert torch.equal(gi[b], d["image"])
        assert len(gs) == 3 and all(g.dtype == torch.bool for g in gs)
        for g, c in zip(gs, d["segmentation"]):
            assert torch.equal(g[b], c)


# ---- sampled parameters follow nnU-Net's probabilities and ranges -----------------------------
def _binom_ok(k, n, p):
    return abs(k - n * p) <= 4.5 * np.sqrt(n * p * (1 - p)) + 1


def _draw(aug, n=1500, channels=2):
    np.random.seed(0)
    torch.manual_seed(0)
    return [aug.sample(n, channels)]


@pytest.mark.parametrize("case", ["3d", "3d_aniso", "2d"])
def test_sampled_parameters_follow_nnunet(case):
    patch, rot, dummy2d = {"3d": ((32, 32, 32), ROT3D, False),
                           "3d_aniso": ((8, 64, 64), ROT180, True),
                           "2d": ((64, 48), (-np.pi / 12, np.pi / 12), False)}[case]
    cpu = nnunet_transforms(patch, rot, dummy2d=dummy2d)
    aug = GPUAugmentation.from_nnunet(cpu, [0, 1, 2], len(patch))
    n, c = 1500, 2
    (params,) = _draw(aug, n, c)
    by_step = dict(zip(map(id, aug.steps), params))
    rnd = {type(t.transform).__name__ + ("_inv" if getattr(t.transform, "p_invert_image", 0) else ""): t
           for t in cpu.transforms if type(t).__name__ == "RandomTransform"}
    for s in aug.steps:
        prm = by_step[id(s)]
        if isinstance(s, RandomIntensityStep):
            key = type(s.t).__name__ + ("_inv" if getattr(s.t, "p_invert_image", 0) else "")
            assert s.p == rnd[key].apply_probability
            assert _binom_ok(prm["applied"].sum(), n, s.p), key
            on = prm["applied"]
            if key == "GaussianNoiseTransform":
                sig = prm["sigma"][on]
                assert (sig >= 0).all() and (sig <= 0.1).all() and (sig[:, 0] == sig[:, 1]).all()
            elif key == "GaussianBlurTransform":
                sig = prm["sigmas"][on].reshape(-1, len(patch))
                used = (sig > 0).any(1)
                assert _binom_ok(used.sum(), len(used), 0.5)
                assert sig[used].min() >= 0.5 and sig[used].max() <= 1.0
            elif key in ("MultiplicativeBrightnessTransform", "ContrastTransform"):
                f = prm["factors"][on]
                assert f.min() >= 0.75 and f.max() <= 1.25 and _binom_ok((f < 1).sum(), f.size, 0.5)
            elif key.startswith("GammaTransform"):
                g = prm["gamma"][on]
                assert g.min() >= 0.7 and g.max() <= 1.5 and _binom_ok((g < 1).sum(), g.size, 0.5)
                assert prm["invert"][on].all() == key.endswith("_inv")
                assert prm["retain"][on].all()
            elif key == "SimulateLowResolutionTransform":
                jobs = prm["jobs"]
                assert _binom_ok(len(jobs), on.sum() * c, 0.5)
                sc = np.array([j[2] for j in jobs])
                if dummy2d:
                    assert (sc[:, 0] == 1).all()
                    sc = sc[:, 1:]
                assert sc.min() >= 0.5 and sc.max() <= 1 and (sc == sc[:, :1]).all()
        elif isinstance(s, MirrorStep):
            for a in range(len(patch)):
                assert _binom_ok(sum(a in ax for ax in prm["axes"]), n, 0.5)
        elif isinstance(s, SpatialStep):
            assert s.pseudo2d == dummy2d
            assert _binom_ok(prm["transformed"].sum(), n, 1 - 0.8 * 0.8)


@pytest.mark.parametrize("dim", [2, 3])
def test_spatial_sampler_matches_nnunet_distribution(dim):
    """Our draws (no grid) against SpatialTransform.get_parameters (tiny grid) over many samples."""
    patch = (4, 4, 4)[:dim]
    t = nnunet_transforms(patch, ROT3D if dim == 3 else ROT180).transforms[0]
    step = SpatialStep(t, False, [0, 1])
    np.random.seed(3)
    ours = step.sample(3000, 1)
    theirs = [t.get_parameters(image=torch.zeros((1, *patch)))["affine"] for _ in range(3000)]
    assert _binom_ok(sum(a is not None for a in theirs), 3000, ours["transformed"].mean())
    a_ours = ours["affines"][ours["transformed"]]
    a_theirs = np.stack([a for a in theirs if a is not None])
    for f in (lambda a: np.abs(np.linalg.det(a)) ** (1 / dim),  # isotropic scale
              lambda a: a[:, 0, 0], lambda a: a[:, -1, 0]):
        assert stats.ks_2samp(f(a_ours), f(a_theirs)).pvalue > 1e-3
    scale = np.abs(np.linalg.det(a_ours)) ** (1 / dim)
    assert scale.min() >= 0.7 - 1e-6 and scale.max() <= 1.4 + 1e-6


# ---- translation and switch -------------------------------------------------------------------
def test_cascade_and_unknown_transforms_stay_on_cpu():
    with pytest.raises(UnsupportedTransform):
        GPUAugmentation.from_nnunet(nnunet_transforms((16, 16, 16), cascaded=True), [0, 1, 2, 3], 3)
    t = nnunet_transforms((16, 16, 16))
    t.transforms[0].p_elastic_deform = 0.1
    with pytest.raises(UnsupportedTransform, match="elastic"):
        GPUAugmentation.from_nnunet(t, [0, 1, 2], 3)


def test_validation_pipeline_is_deterministic_label_steps_only():
    val = nnUNetTrainer.get_validation_transforms([[1.0] * 3, [0.5] * 3], is_cascaded=False,
                                                  foreground_labels=[1, 2], regions=[(1, 2), (2,)],
                                                  ignore_label=None)
    with pytest.raises(UnsupportedTransform, match="SpatialTransform"):
        GPUAugmentation.from_nnunet(val, [0, 1, 2], 3)  # a training pipeline needs one
    aug = GPUAugmentation.from_nnunet(val, [0, 1, 2], 3, validation=True)
    assert aug.spatial_step is None and all(isinstance(s, LabelStep) for s in aug.steps)
    seg = blobs((8, 8, 8))[None]
    data, target = aug(torch.ones((1, 2, 8, 8, 8)), seg.clone())
    assert [tuple(t.shape) for t in target] == [(1, 2, 8, 8, 8), (1, 2, 4, 4, 4)]
    assert torch.equal(target[0][0, 1], seg[0, 0] == 2)  # region (2,), padding -1 counts as background
    with pytest.raises(UnsupportedTransform, match="random"):
        GPUAugmentation.from_nnunet(nnunet_transforms((16, 16, 16)), [0, 1, 2], 3, validation=True)


def test_whole_pipeline_shapes_and_label_check():
    patch = (12, 16, 16)
    aug = GPUAugmentation.from_nnunet(nnunet_transforms(patch, ds=[[1, 1, 1], [0.5, 0.5, 0.5]]),
                                      [0, 1, 2], 3)
    data, seg = torch.stack([image((20, 26, 25), seed=b) for b in range(2)]), \
        torch.stack([blobs((20, 26, 25), seed=b) for b in range(2)])
    out, target = aug(data, seg)
    assert out.shape == (2, 2, *patch) and torch.isfinite(out).all()
    assert [t.shape for t in target] == [(2, 1, 12, 16, 16), (2, 1, 6, 8, 8)]
    assert set(target[0].unique().tolist()) <= {0, 1, 2}  # -1 became 0
    aug2 = GPUAugmentation.from_nnunet(nnunet_transforms(patch), [0, 1], 3)
    with pytest.raises(ValueError, match="dataset.json"):
        aug2(data, seg)


def test_switch(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert gpu_augmentation_setting(cuda, environ={})[0]
    assert not gpu_augmentation_setting(cpu, environ={})[0]
    assert gpu_augmentation_setting(cpu, environ={"NNUNET_MAMBA_GPU_AUGMENTATION": "1"})[0]
    assert not gpu_augmentation_setting(cuda, environ={"NNUNET_MAMBA_GPU_AUGMENTATION": "0"})[0]
    assert not gpu_augmentation_setting(cuda, False, environ={"NNUNET_MAMBA_GPU_AUGMENTATION": "1"})[0]
    with pytest.raises(ValueError, match="NNUNET_MAMBA_GPU_AUGMENTATION"):
        gpu_augmentation_setting(cuda, environ={"NNUNET_MAMBA_GPU_AUGMENTATION": "maybe"})
    from nnunet_mamba.training.base import MambaTrainerBase
    from nnunet_mamba.training.gpu_augmentation_trainer import GPUAugmentationMixin
    assert issubclass(MambaTrainerBase, GPUAugmentationMixin)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    patch = (24, 28, 20)
    aug = GPUAugmentation.from_nnunet(nnunet_transforms(patch, ds=[[1, 1, 1], [0.5, 0.5, 0.5]]),
                                      [0, 1, 2], 3)
    data = torch.stack([image((34, 38, 30), seed=b) for b in range(2)])
    seg = torch.stack([blobs((34, 38, 30), seed=b) for b in range(2)])
    np.random.seed(0)
    torch.manual_seed(0)
    params = aug.sample(2, 2)
    for p in params:  # no noise: its values come from the device's generator
        if "sigma" in p:
            p["sigma"][:] = 0
    a, ta = aug(data.clone(), seg.clone(), params)
    b, tb = aug(data.cuda(), seg.cuda(), params)
    torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
    assert (tb[0].cpu() == ta[0]).float().mean() > 0.999


# ---- smoke training through nnU-Net's CLI ---------------------------------------------------
@pytest.mark.slow
def test_nnunet_train_with_gpu_augmentation_on_cpu(tmp_path):
    from nnunet_mamba.demo import make_synthetic_dataset
    from nnunet_mamba.nnunet.commands import nnunet_env
    bin_dir = Path(sys.executable).parent
    env = nnunet_env(tmp_path)
    env.pop("nnUNet_extTrainer", None)
    env["NNUNET_MAMBA_GPU_AUGMENTATION"] = "1"  # force the batched path on the CPU device
    env["NNUNET_MAMBA_SYNC_FREE_STEP"] = "1"  # and the sync-free steps: both are on by default on CUDA
    make_synthetic_dataset(tmp_path / "nnUNet_raw", 989, "GPUAug", num_train=5, num_test=0,
                           shape=(24, 32, 32), spacing=(1.0, 1.0, 1.0), seed=0)

    def run(*cmd):
        proc = subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], env=env, timeout=600, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.returncode == 0, proc.stdout[-6000:]
        return proc.stdout

    run("nnUNetv2_plan_and_preprocess", "-d", "989", "-c", "3d_fullres", "2d", "-np", "1", "-npfp", "1")
    env.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1")  # one loader worker process is enough here
    out = run("nnUNetv2_train", "989", "3d_fullres", "0", "-tr", "nnUNetTrainer_GPUAug_smoke",
              "-device", "cpu")
    assert "GPU augmentation on" in out, out[-3000:]
    fold = (tmp_path / "nnUNet_results" / "Dataset989_GPUAug"
            / "nnUNetTrainer_GPUAug_smoke__nnUNetPlans__3d_fullres" / "fold_0")
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer_GPUAug_smoke"
    assert np.isfinite(ckpt["logging"]["train_losses"]).all()
    assert np.isfinite(ckpt["logging"]["val_losses"]).all()  # read once per epoch from the device
    assert all(0 <= d <= 1 for d in ckpt["logging"]["mean_fg_dice"])
    assert (fold / "validation" / "summary.json").exists()
    for configuration in ("3d_fullres", "2d"):
        _check_cropping_loader(tmp_path / "nnUNet_preprocessed" / "Dataset989_GPUAug", configuration)


def _check_cropping_loader(preprocessed: Path, configuration: str):
    """CroppingLoader samples as nnU-Net's loader does and sends the centred box of its patch;
    for validation it sends nnU-Net's patch, and the validation transforms on the device give
    nnU-Net's validation batch (with and without regions)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mamba.training.gpu_augmentation_trainer import CroppingLoader
    plans = PlansManager(str(preprocessed / "nnUNetPlans.json"))
    cm = plans.get_configuration(configuration)
    lm = plans.get_label_manager(json.loads((preprocessed / "dataset.json").read_text()))
    folder = str(preprocessed / cm.data_identifier)
    dataset = infer_dataset_class(folder)(folder)
    patch = tuple(cm.patch_size)
    dim = len(patch)
    initial = tuple(int(i) for i in get_patch_size(patch, ROT3D, ROT3D, ROT3D, (0.85, 1.25)))
    step = SpatialStep(copy.deepcopy(nnunet_transforms(patch).transforms[0]), False, [0, 1, 2])
    quarter_turn = [[0.0, -1, 0], [1, 0, 0], [0, 0, 1]] if dim == 3 else [[0.0, -1], [1, 0]]
    rotated = {"affines": np.stack([np.eye(dim), quarter_turn]), "transformed": np.array([False, True])}
    for params in ({"affines": np.stack([np.eye(dim)] * 2), "transformed": np.zeros(2, bool)}, rotated):
        step.sample = lambda n, c, params=params: params  # fixed parameters, no random draws
        ours = CroppingLoader(dataset, 2, initial, patch, lm, oversample_foreground_percent=0.33,
                              spatial_step=step)
        theirs = nnUNetDataLoader(dataset, 2, initial, patch, lm, oversample_foreground_percent=0.33)
        for seed in range(3):
            np.random.seed(seed)
            a = ours.generate_train_batch()
            np.random.seed(seed)
            b = theirs.generate_train_batch()
            assert list(a["keys"]) == list(b["keys"]) and a["data"].dtype == torch.float16 and a["target"].dtype == torch.int8
            box = (slice(None), slice(None)) + ops.center_crop_slices(initial, a["data"].shape[2:])
            torch.testing.assert_close(a["data"].float(), b["data"][box], atol=1e-2, rtol=1e-3)
            assert torch.equal(a["target"].to(torch.int16), b["target"][box])
            assert a["spatial"] is params
        expected = step.needed_extent(params, initial)
        assert tuple(a["data"].shape[2:]) == expected and (params is rotated or np.prod(expected) < np.prod(initial))
    # validation: nnU-Net's patch, nnU-Net's validation transforms on the device
    labels = list(lm.all_labels)
    for regions in (None, [tuple(lm.foreground_labels), tuple(lm.foreground_labels[1:])]):
        val_transforms = nnUNetTrainer.get_validation_transforms(
            [[1.0] * dim, [0.5] * dim], is_cascaded=False, foreground_labels=lm.foreground_labels,
            regions=regions, ignore_label=None)
        aug = GPUAugmentation.from_nnunet(val_transforms, labels, dim, validation=True)
        ours = CroppingLoader(dataset, 2, patch, patch, lm, oversample_foreground_percent=0.33,
                              spatial_step=None)
        theirs = nnUNetDataLoader(dataset, 2, patch, patch, lm, oversample_foreground_percent=0.33,
                                  transforms=val_transforms)
        for seed in range(3):
            np.random.seed(seed)
            a = ours.generate_train_batch()
            np.random.seed(seed)
            b = theirs.generate_train_batch()
            data, target = aug(a["data"], a["target"])
            torch.testing.assert_close(data, b["data"], atol=1e-2, rtol=1e-3)
            assert len(target) == len(b["target"]) == 2
            for ours_t, theirs_t in zip(target, b["target"]):
                assert ours_t.dtype == theirs_t.dtype and torch.equal(ours_t, theirs_t)


class _TinyDataset:
    """Two cases of 8^3 voxels, smaller than the patch (padding on every side)."""

    identifiers = ["a", "b"]

    def __init__(self, scale: float):
        rng = np.random.default_rng(0)
        self.cases = {k: (rng.standard_normal((2, 8, 8, 8)).astype(np.float32) * scale,
                          rng.integers(0, 3, (1, 8, 8, 8)).astype(np.int8)) for k in self.identifiers}

    def load_case(self, key):
        image, seg = self.cases[key]
        return image, seg, None, {"class_locations": {c: np.argwhere(seg == c) for c in (1, 2)}}


@pytest.mark.parametrize("scale, check, dtype", [(1.0, True, torch.float16), (1e6, True, torch.float32),
                                                 (1.0, False, torch.float16)])
def test_cropping_loader_pads_and_keeps_large_values(scale, check, dtype):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_mamba.training.gpu_augmentation_trainer import CroppingLoader
    lm = LabelManager({"background": 0, "a": 1, "b": 2}, None)
    data = _TinyDataset(scale)
    loader = CroppingLoader(data, 2, (12, 12, 12), (12, 12, 12), lm, oversample_foreground_percent=0.0,
                            spatial_step=None, check_float16_range=check)
    batch = loader.generate_train_batch()
    assert batch["data"].dtype == dtype and batch["data"].shape == (2, 2, 12, 12, 12)
    assert batch["data"].is_shared() and batch["target"].dtype == torch.int8
    for j, key in enumerate(batch["keys"]):
        image, seg = data.cases[key]
        # the 8^3 case sits inside the 12^3 patch (nnU-Net centres it): zeros / -1 around it
        inside = batch["target"][j, 0] != -1
        assert inside.sum() == 8 ** 3
        torch.testing.assert_close(batch["data"][j][:, inside].float(),
                                   torch.from_numpy(image).reshape(2, -1).to(dtype).float())
        assert (batch["data"][j][:, ~inside] == 0).all()


def test_label_ops_match_their_definitions():
    """Masking (all or some channels), label removal and the region lookup against the
    plain definitions, with padding (-1), labels outside every region and a large label."""
    from nnunet_mamba.training import gpu_augmentation_ops as ops
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(-1, 6, (2, 2, 5, 6, 7), generator=g, dtype=torch.int16)
    seg[0, 0, 0, 0, 0] = 300
    img = torch.randn(2, 3, 5, 6, 7, generator=g)
    for channels in ([0, 1, 2], [2, 0]):
        ref = img.clone()
        for c in channels:
            ref[:, c][seg[:, 1] < 0] = 7.0
        torch.testing.assert_close(ops.mask_image(img.clone(), seg, channels, 1, 7.0), ref, rtol=0, atol=0)
    for channels in (None, [1]):
        ref = seg.clone()
        for c in (range(2) if channels is None else channels):
            ref[:, c][ref[:, c] == 3] = 0
        assert torch.equal(ops.remove_label(seg.clone(), 3, 0, channels), ref)
    regions = [(1, 2, 3), (2, 3), (3,), (5,)]
    out = ops.to_regions(seg, regions, channel=0)
    assert out.dtype == torch.bool and out.shape == (2, 4, 5, 6, 7) and out.is_contiguous()
    for r, labels in enumerate(regions):
        assert torch.equal(out[:, r], torch.isin(seg[:, 0], torch.tensor(labels, dtype=torch.int16)))
