"""Every trainer on every nnU-Net configuration (issue 13): 2d, anisotropic 3d_fullres,
3d_lowres and 3d_cascade_fullres from real ConfigurationManager objects; finite outputs of
nnMamba's BatchNorm after a few iterations; end to end on a tiny 2D dataset (every trainer)
and an anisotropic 3D dataset (nnMamba, SegMamba) through nnU-Net's own commands.
"""
from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch

from nnunet_mamba.model_table import brats_plans, count_params
from nnunet_mamba.networks import SegMamba, nnMambaSeg
from nnunet_mamba.networks.blocks import BiasCorrectedBatchNorm3d, ConvOps
from nnunet_mamba.networks.from_plans import PlansConfigurationError
from nnunet_mamba.ssm import FORWARD, INTER_SLICE, MICCSS_FLIPS, NAMED_ORDERS, from_sequence, to_sequence

TRAINERS = ["nnMambaTrainer", "nnMambaTrainer_InstanceNorm", "SegMambaTrainer",
            "TamingSegMambaTrainer", "BiSegMambaTrainer", "MultiSegMambaTrainer",
            "SegMambaSkipTrainer", "UMambaBotTrainer", "UMambaEncTrainer", "UNETRTrainer"]
CONFIGURATIONS = ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
# one trainer per network family trains 2d through nnUNetv2_train; the variants (another norm,
# another Mamba layer on the same backbone, another U-Mamba placement) are built and run in
# every configuration by test_every_trainer_builds_and_runs_every_configuration and trained
# through nnUNetv2_train in 3d by tests/test_e2e_nnunet.py
FAMILIES = ["nnMambaTrainer", "SegMambaTrainer", "TamingSegMambaTrainer", "UMambaBotTrainer", "UNETRTrainer"]
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
                "numTraining": 5, "file_ending": ".nii.gz"}
# nnU-Net's plans for 4 x 1 x 1 mm data: in-plane pooling first, 1 x 3 x 3 kernels until the
# spacing is nearly isotropic (as ExperimentPlanner plans 0.66 x 0.66 x 3.3 mm scans)
ANISO_STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
ANISO_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]


def _arch(dim: int, strides, kernels, features) -> dict:
    n = len(strides)
    conv, norm = ("Conv3d", "InstanceNorm3d") if dim == 3 else ("Conv2d", "InstanceNorm2d")
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": features, "conv_op": f"torch.nn.modules.conv.{conv}",
            "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.{norm}",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def plans() -> dict:
    """nnU-Net plans with all four configurations of a small anisotropic (4 x 1 x 1 mm) dataset."""
    p = copy.deepcopy(brats_plans())
    base = p["configurations"]["3d_fullres"]
    common = {k: v for k, v in base.items() if k != "architecture"}
    common.update(normalization_schemes=["CTNormalization"], use_mask_for_norm=[False],
                  batch_size=2)
    p["configurations"] = {
        "2d": {**common, "data_identifier": "nnUNetPlans_2d", "patch_size": [32, 32],
               "spacing": [1.0, 1.0], "median_image_size_in_voxels": [40, 40],
               "architecture": _arch(2, [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5, [4, 8, 16, 32, 32])},
        "3d_fullres": {**common, "patch_size": [16, 32, 32], "spacing": [4.0, 1.0, 1.0],
                       "median_image_size_in_voxels": [16, 40, 40],
                       "architecture": _arch(3, ANISO_STRIDES, ANISO_KERNELS, [4, 8, 16, 32, 32])},
        "3d_lowres": {**common, "data_identifier": "nnUNetPlans_3d_lowres",
                      "patch_size": [16, 16, 16], "spacing": [4.0, 2.0, 2.0],
                      "median_image_size_in_voxels": [16, 20, 20], "next_stage": "3d_cascade_fullres",
                      "architecture": _arch(3, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                                            [[1, 3, 3]] + [[3, 3, 3]] * 3, [4, 8, 16, 32])},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
    }
    p["foreground_intensity_properties_per_channel"] = {"0": {
        "mean": 0.0, "std": 1.0, "median": 0.0, "min": -3.0, "max": 3.0,
        "percentile_00_5": -2.5, "percentile_99_5": 2.5}}
    return {**p, "dataset_name": "Dataset990_Aniso", "continue_training": False}


@pytest.fixture(autouse=True)
def _nnunet_env(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path))


@functools.lru_cache(maxsize=None)
def trainer_class(name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(name)


def configuration(name, p=None):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(p or plans())
    return pm, pm.get_configuration(name)


# ---- every trainer x every configuration ----------------------------------------------------
#: narrower nnMamba / SegMamba for the CPU forward/backward (the plans give their strides and
#: kernels; the widths are the papers', tested on the meta device)
SMALL = {nnMambaSeg: {"base_channels": 4, "blocks_per_stage": 2},
         SegMamba: {"widths": (4, 8, 16, 32), "hidden": 32}}


def _first_conv(net):
    return next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))


@pytest.mark.parametrize("config", CONFIGURATIONS)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_builds_and_runs_every_configuration(trainer, config):
    """The trainer's own network for the configuration (meta device: dimensionality, input
    channels, deep-supervision scales as nnU-Net expects them); for 2d and anisotropic
    3d_fullres also a CPU forward/backward (3d_lowres / cascade: the same networks)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    torch.manual_seed(0)
    cls = trainer_class(trainer)
    pm, cm = configuration(config)
    n_in = determine_num_input_channels(pm, cm, DATASET_JSON)
    assert n_in == (3 if config == "3d_cascade_fullres" else 1)  # cascade: + one-hot of 2 labels
    t = cls(plans(), config, 0, DATASET_JSON, device=torch.device("cpu"))
    with torch.device("meta"):
        t.network = cls.build_network_architecture(pm, cm, n_in, 3, t.enable_deep_supervision)
    dim = len(cm.patch_size)
    conv = _first_conv(t.network)
    assert isinstance(conv, torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d)
    assert conv.in_channels == n_in
    scales = t._get_deep_supervision_scales()
    if scales:  # what nnU-Net expects from the plans: 1 / cumprod(pool_op_kernel_sizes), a prefix
        expected = nnUNetTrainer._get_deep_supervision_scales(t)
        assert [list(map(float, s)) for s in expected[:len(scales)]] == scales
        assert len(scales) >= 3
    if config not in ("2d", "3d_fullres"):
        return
    small = SMALL.get(cls.network_class)
    net = (cls.network_class.from_plans(cm, n_in, 3, t.enable_deep_supervision,
                                        **{**cls.network_kwargs, **small}) if small else
           cls.build_network_architecture(pm, cm, n_in, 3, t.enable_deep_supervision))
    assert getattr(net, "ds_scales", None) == getattr(t.network, "ds_scales", None)
    out = net(torch.randn(2, n_in, *cm.patch_size))
    outs = out if scales else [out]
    assert len(outs) == len(scales or [None])
    for o, s in zip(outs, scales or [[1.0] * dim]):
        assert o.shape == (2, 3, *[round(p * f) for p, f in zip(cm.patch_size, s)])
        assert torch.isfinite(o).all()
    sum(o.square().mean() for o in outs).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if trainer != "UNETRTrainer":
        assert any(n.endswith("A_log") and p.grad is not None
                   for n, p in net.named_parameters()), "Mamba not in the graph"


def test_nnmamba_and_segmamba_follow_the_plans_pooling():
    _, cm = configuration("3d_fullres")
    net = nnMambaSeg.from_plans(cm, 1, 3)
    assert net.encoder.strides == [tuple(s) for s in ANISO_STRIDES[1:]]
    assert [tuple(m.stride) for m in net.encoder.stem.modules()
            if isinstance(m, torch.nn.Conv3d)][0] == (1, 2, 2)
    assert net.encoder.stem[0][0].kernel_size == (1, 3, 3)  # the plans' kernel of that level
    assert net.encoder.divisor == (4, 16, 16)
    assert net.ds_scales[1:] == [(1.0, 0.5, 0.5), (1.0, 0.25, 0.25), (0.5, 0.125, 0.125)]
    seg = SegMamba.from_plans(cm, 1, 3)
    assert seg.encoder.stem.stride == (1, 2, 2) and seg.encoder.stem.kernel_size == (1, 7, 7)
    assert seg.encoder.downsamples[0][1].stride == (1, 2, 2)
    assert seg.decoder.up_blocks[-1].up.stride == (1, 2, 2)  # the last up block undoes the stem
    _, cm2 = configuration("2d")
    assert isinstance(nnMambaSeg.from_plans(cm2, 1, 3).encoder.stem[0][0], torch.nn.Conv2d)


@pytest.mark.parametrize("cls,counts", [(nnMambaSeg, {(1, 16): 15_956_014, (4, 3): 15_955_434}),
                                        (SegMamba, {(4, 4): 67_416_196, (4, 3): 67_416_147})])
def test_isotropic_brats_plans_give_the_papers_networks(cls, counts):
    """From the BraTS plans (128^3, strides 2, kernels 3) the networks are the papers' (the
    counts of the fixed isotropic networks before issue 13)."""
    _, cm = configuration("3d_fullres", brats_plans())
    for (n_in, n_out), expected in counts.items():
        with torch.device("meta"):
            assert count_params(cls.from_plans(cm, n_in, n_out, deep_supervision=False)) == expected
            assert count_params(cls(n_in, n_out)) == expected


def test_unservable_configuration_is_refused_before_training_with_the_alternative():
    p = plans()
    p["configurations"]["2d"]["architecture"] = _arch(2, [[1, 1], [2, 2]], [[3, 3]] * 2, [4, 8])
    t = trainer_class("nnMambaTrainer")(p, "2d", 0, DATASET_JSON, device=torch.device("cpu"))
    with pytest.raises(PlansConfigurationError, match=r"nnMambaTrainer cannot train configuration "
                                                      r"'2d'.*pools 1 times.*Alternatives"):
        t.initialize()


# ---- scan orders in 2D ----------------------------------------------------------------------
def test_2d_scan_orders_are_bijections_and_inter_slice_reads_columns():
    x = torch.randn(2, 3, 4, 5)
    for name, order in NAMED_ORDERS.items():
        seq = to_sequence(x, order)
        assert seq.shape == (2, 20, 3)
        torch.testing.assert_close(from_sequence(seq, (4, 5), order), x, rtol=0, atol=0)
        p = order.permutation((4, 5))
        ref = x.flatten(2).transpose(1, 2)[:, p]
        torch.testing.assert_close(seq, ref.flip(2) if order.flip_channels else ref, rtol=0, atol=0)
    assert FORWARD.permutation((2, 3)).tolist() == [0, 1, 2, 3, 4, 5]
    assert INTER_SLICE.permutation((2, 3)).tolist() == [0, 3, 1, 4, 2, 5]  # column-major
    assert MICCSS_FLIPS[2].permutation((2, 3)).tolist() == [5, 4, 3, 2, 1, 0]


# ---- finite outputs: nnMamba's BatchNorm -----------------------------------------------------
def test_bias_corrected_batchnorm_eval_statistics_are_the_batch_average():
    torch.manual_seed(0)
    bn, plain = BiasCorrectedBatchNorm3d(3), torch.nn.BatchNorm3d(3)
    batches = [torch.randn(2, 3, 2, 3, 4) * 7 + 20 for _ in range(2)]
    for b in batches:
        bn(b), plain(b)
    m = 0.1
    w = torch.tensor([m * (1 - m), m]) / (1 - (1 - m) ** 2)  # EMA weights, init share removed
    mean = sum(wi * b.mean(dim=(0, 2, 3, 4)) for wi, b in zip(w, batches))
    var = sum(wi * b.var(dim=(0, 2, 3, 4)) for wi, b in zip(w, batches))
    bn.eval(), plain.eval()
    x = torch.randn(1, 3, 2, 3, 4) * 7 + 20
    expected = (x - mean[:, None, None, None]) / torch.sqrt(var[:, None, None, None] + bn.eps)
    torch.testing.assert_close(bn(x), expected, rtol=1e-4, atol=1e-4)
    assert plain(x).abs().mean() > 5 * bn(x).abs().mean()  # plain BN: 81 % of mean 0 / var 1
    # after many steps the correction vanishes: the paper's BatchNorm
    bn.train(), plain.train()
    for _ in range(200):
        b = torch.randn(2, 3, 2, 3, 4) * 7 + 20
        bn(b), plain(b)
    bn.eval(), plain.eval()
    torch.testing.assert_close(bn(x), plain(x), rtol=1e-5, atol=1e-5)


def test_bias_corrected_batchnorm_loads_old_state_dicts_as_plain_batchnorm():
    plain = torch.nn.BatchNorm3d(2)
    plain.running_mean.fill_(3.0), plain.running_var.fill_(4.0)
    bn = BiasCorrectedBatchNorm3d(2)
    bn.load_state_dict(plain.state_dict())  # no init_share: taken as fully trained
    assert bn.init_share.item() == 0.0
    x = torch.randn(1, 2, 2, 2, 2)
    torch.testing.assert_close(bn.eval()(x), plain.eval()(x))
    assert ConvOps.create(3, "batch").norm is BiasCorrectedBatchNorm3d


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_nnmamba_eval_logits_stay_finite_and_close_to_train_mode_after_two_steps(norm):
    """The issue's failure: BatchNorm's running statistics after two iterations on data with
    a variance far from 1 made eval-mode logits explode (inf in nnU-Net's predictor)."""
    torch.manual_seed(0)
    _, cm = configuration("3d_fullres")
    net = nnMambaSeg.from_plans(cm, 1, 3, deep_supervision=False, base_channels=8,
                                blocks_per_stage=2, norm=norm)
    x = torch.randn(2, 1, 16, 32, 32) * 300 + 40  # CT-like intensities, not normalised
    y = (x[:, 0] > 200).long()
    opt = torch.optim.Adam(net.parameters(), 2e-3, weight_decay=1e-3)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        train_logits = net(x)
        net.eval()
        eval_logits = net(x)
    assert torch.isfinite(eval_logits).all()
    assert eval_logits.abs().max() < 10 * train_logits.abs().max() + 10


# ---- end to end through nnU-Net's commands ------------------------------------------------
E2E_2D_ID, E2E_3D_ID = 991, 992


def _write_dataset(raw, dataset_id, name, shape, spacing, num_train=5, num_test=1, seed=0):
    """A tiny labelled dataset in nnU-Net's raw format (one channel, labels 1 and 2)."""
    import SimpleITK as sitk
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(num_train + num_test):
        seg = np.zeros(shape, np.uint8)
        centre = [rng.uniform(0.3, 0.7) * s for s in shape]
        radius = [max(1.0, rng.uniform(0.15, 0.25) * s) for s in shape]
        seg[sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius)) <= 1] = 1
        seg[tuple(slice(s // 8, s // 8 + max(1, s // 5)) for s in shape)] = 2
        img = (rng.normal(0, 1, shape) + 3.0 * (seg == 1) + 1.5 * (seg == 2)).astype(np.float32)
        split = "Tr" if i < num_train else "Ts"
        items = [(img, folder / f"images{split}" / f"c{i:02d}_0000.nii.gz")]
        if split == "Tr":
            items.append((seg, folder / "labelsTr" / f"c{i:02d}.nii.gz"))
        for arr, path in items:
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(tuple(float(s) for s in reversed(spacing)))
            sitk.WriteImage(im, str(path))
    (folder / "dataset.json").write_text(json.dumps({**DATASET_JSON, "numTraining": num_train,
                                                     "channel_names": {"0": "MRI"}}))
    return folder


def _planned(tmp_path_factory, dataset_id, name, shape, spacing, config):
    from nnunet_mamba.nnunet.commands import nnunet_env
    from tests.test_e2e_nnunet import run
    work = tmp_path_factory.mktemp(name)
    env = nnunet_env(work)
    env.pop("nnUNet_extTrainer", None)  # registration must come from the installed .pth
    folder = _write_dataset(work / "nnUNet_raw", dataset_id, name, shape, spacing)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", config, "-np", "2",
         "-npfp", "2"], env)
    # smoke runs of 2 iterations: augmentation in the training process (no workers filling
    # queues ahead on a 2-core CI machine), one export worker
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"})
    return work, env, folder


@pytest.fixture(scope="module")
def planned_2d(tmp_path_factory):
    """Six 1 x 64 x 64 images: nnU-Net's 2d configuration, one preprocessed set for all trainers."""
    return _planned(tmp_path_factory, E2E_2D_ID, "Tiny2D", (1, 64, 64), (1.0, 1.0, 1.0), "2d")


@pytest.fixture(scope="module")
def planned_aniso(tmp_path_factory):
    """Six 12 x 48 x 48 volumes at 4 x 1 x 1 mm: nnU-Net plans in-plane pooling first."""
    return _planned(tmp_path_factory, E2E_3D_ID, "Aniso", (12, 48, 48), (4.0, 1.0, 1.0),
                    "3d_fullres")


def _train_predict_check(work, env, folder, dataset_id, config, trainer, predict):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from tests.test_e2e_nnunet import run
    name = f"{trainer}_smoke"
    out = run(["nnUNetv2_train", str(dataset_id), config, "0", "-tr", name, "-device", "cpu"], env)
    assert f"Using trainer '{name}'" in out
    model = next((work / "nnUNet_results").glob(f"Dataset{dataset_id:03d}_*")) / \
        f"{name}__nnUNetPlans__{config}"
    assert (model / "fold_0" / "validation" / "summary.json").exists()
    # the validation logits of the trained network, as nnU-Net's predictor computes them
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    pre = next((work / "nnUNet_preprocessed").glob(f"Dataset{dataset_id:03d}_*"))
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder_pre = str(pre / f"nnUNetPlans_{config}")
    dataset = infer_dataset_class(folder_pre)(folder_pre)
    data = torch.from_numpy(np.asarray(dataset.load_case(dataset.identifiers[0])[0][:]).astype(np.float32))
    logits = predictor.predict_logits_from_preprocessed_data(data)
    assert logits.shape[0] == 3 and torch.isfinite(logits).all(), f"{trainer}: non-finite logits"
    if predict:
        pred = work / f"pred_{name}"
        run(["nnUNetv2_predict", "-i", str(folder / "imagesTs"), "-o", str(pred), "-d",
             str(dataset_id), "-c", config, "-f", "0", "-tr", name, "-device", "cpu",
             "-npp", "1", "-nps", "1"], env)
        import SimpleITK as sitk
        for img in (folder / "imagesTs").glob("*_0000.nii.gz"):
            p = sitk.ReadImage(str(pred / img.name.replace("_0000", "")))
            assert p.GetSize() == sitk.ReadImage(str(img)).GetSize()
            assert set(np.unique(sitk.GetArrayFromImage(p)).tolist()) <= {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", FAMILIES)
def test_2d_dataset_end_to_end(planned_2d, trainer):
    """A trainer of each family trains and validates 2d through nnUNetv2_train with finite logits;
    nnUNetv2_predict runs for one trainer of each family (nnMamba, SegMamba, U-Mamba)."""
    work, env, folder = planned_2d
    _train_predict_check(work, env, folder, E2E_2D_ID, "2d", trainer,
                         predict=trainer in ("nnMambaTrainer", "SegMambaTrainer", "UMambaBotTrainer"))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["nnMambaTrainer", "SegMambaTrainer"])
def test_anisotropic_3d_dataset_end_to_end(planned_aniso, trainer):
    work, env, folder = planned_aniso
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pre = next((work / "nnUNet_preprocessed").glob(f"Dataset{E2E_3D_ID:03d}_*"))
    cm = PlansManager(str(pre / "nnUNetPlans.json")).get_configuration("3d_fullres")
    assert list(cm.pool_op_kernel_sizes[1]) == [1, 2, 2]  # anisotropic pooling planned
    _train_predict_check(work, env, folder, E2E_3D_ID, "3d_fullres", trainer, predict=True)
