"""nnMambaSeg: shapes, deep supervision, size; nnMambaTrainer: network from plans, DS switch."""
from __future__ import annotations

import pytest
import torch

from nnunet_mamba.networks import nnMambaSeg
from nnunet_mamba.networks.blocks import MICCSS, crop_to, pad_to_multiple
from nnunet_mamba.ssm import MICCSS_FLIPS, Mamba, memory_format_of


def count_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_count_matches_paper_range():
    n = count_params(nnMambaSeg(1, 16))
    assert 15.5e6 <= n <= 16.1e6, n  # paper: 15.55 M


def test_one_mamba_per_stage_shared_by_the_non_strided_blocks():
    net = nnMambaSeg(1, 2, base_channels=8)
    for stage in net.encoder.stages:
        assert stage[0].branch is None
        assert stage[1].branch is stage[2].branch
        assert isinstance(stage[1].branch, MICCSS)
    assert len([m for m in net.modules() if isinstance(m, MICCSS)]) == 3


@pytest.mark.parametrize("shape", [(32, 32, 32), (20, 40, 36), (17, 23, 29)])
def test_shapes_with_and_without_deep_supervision(shape):
    torch.manual_seed(0)
    net = nnMambaSeg(2, 3, base_channels=8, blocks_per_stage=2, deep_supervision=True)
    x = torch.randn(2, 2, *shape)
    outs = net(x)
    assert len(outs) == len(net.ds_scales) == 4
    for o, s in zip(outs, net.ds_scales):
        assert o.shape == (2, 3, *[round(d * f) for d, f in zip(shape, s)])  # per-axis scales
    sum(o.float().mean() for o in outs).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.decoder.deep_supervision = False
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, *shape)


def test_padding_never_crops_the_image():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(1, 1, 2, 3, 35)
    padded, shape = pad_to_multiple(x, 16)
    assert padded.shape[2:] == (16, 16, 48)
    assert torch.equal(crop_to(padded, shape), x)


def test_miccss_averages_four_siamese_views_with_one_mamba():
    block = MICCSS(8)
    assert block.views == MICCSS_FLIPS and len(block.views) == 4
    x = torch.randn(1, 8, 4, 5, 6)
    assert block(x).shape == x.shape
    assert sum(isinstance(m, Mamba) for m in block.modules()) == 1


def _plans(patch=(20, 24, 28)):
    return {
        "dataset_name": "Dataset999_Test", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [40, 40, 40],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [40, 40, 40],
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": {}, "_kw_requires_import": []},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {}, "continue_training": False,
    }


def test_trainer_builds_network_from_plans_and_switches_deep_supervision(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cls = recursive_find_trainer_class_by_name("nnMambaTrainer")
    pm = PlansManager(_plans())
    cm = pm.get_configuration("3d_fullres")
    net = cls.build_network_architecture(pm, cm, 4, 3, enable_deep_supervision=False)
    assert isinstance(net, torch.nn.Module) and net.decoder.deep_supervision is False
    dataset_json = {"channel_names": {"0": "a", "1": "b", "2": "c", "3": "d"},
                    "labels": {"background": 0, "wt": [1, 2, 3], "tc": [1, 3], "et": [3]},
                    "regions_class_order": [2, 1, 3], "numTraining": 1, "file_ending": ".nii.gz"}
    trainer = cls(_plans(), "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    assert (trainer.initial_lr, trainer.weight_decay, trainer.num_epochs) == (2e-3, 1e-3, 100)
    trainer.network = cls.build_network_architecture(pm, cm, 4, 3, True)
    trainer.optimizer, _ = trainer.configure_optimizers()
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert trainer._get_deep_supervision_scales() == [[1.0] * 3, [0.5] * 3, [0.25] * 3, [0.125] * 3]
    trainer.set_deep_supervision_enabled(False)
    assert trainer.network.decoder.deep_supervision is False
    trainer.set_deep_supervision_enabled(True)
    out = trainer.network(torch.randn(1, 4, 20, 24, 28))
    assert [o.shape[2:] for o in out][1] == (10, 12, 14)


def test_short_variants_exist():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    smoke = recursive_find_trainer_class_by_name("nnMambaTrainer_smoke")
    assert smoke.hyperparameters["num_iterations_per_epoch"] == 2
    assert recursive_find_trainer_class_by_name("nnMambaTrainer_5epochs").hyperparameters["num_epochs"] == 5


def test_old_nnunetv2_is_refused_with_the_fix():
    from nnunet_mamba.training.base import require_nnunetv2
    with pytest.raises(ImportError, match=r"nnunetv2>=2\.8.*pip install -U"):
        require_nnunetv2("2.6.2")
    assert require_nnunetv2("2.8.1") == "2.8.1"


@pytest.mark.parametrize("dim", [2, 3])
def test_channels_last_gives_the_same_numbers(dim):
    """The channels-last layout (the default for CUDA inputs in eager mode) is a speed choice:
    outputs and gradients equal the NCDHW ones (float64)."""
    torch.manual_seed(0)
    kw = dict(deep_supervision=True, spatial_dims=dim, base_channels=8)
    ref = nnMambaSeg(2, 3, channels_last=False, **kw).double()
    cl = nnMambaSeg(2, 3, channels_last=True, **kw).double()
    cl.load_state_dict(ref.state_dict())
    x = torch.randn(2, 2, *([16] * dim), dtype=torch.float64)
    out_ref, out_cl = ref(x), cl(x)
    fmt = torch.channels_last_3d if dim == 3 else torch.channels_last
    for a, b in zip(out_ref, out_cl):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-8)  # float64, other conv algorithms
    seen = {}  # the layout the encoder receives
    for net in (ref, cl):
        net.encoder.register_forward_pre_hook(
            lambda m, inp, net=net: seen.__setitem__(net, memory_format_of(inp[0])))
    ref(x), cl(x)
    assert seen[ref] == torch.contiguous_format and seen[cl] == fmt
    sum(o.square().mean() for o in out_ref).backward()
    sum(o.square().mean() for o in out_cl).backward()
    for (name, p), q in zip(ref.named_parameters(), cl.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)
    assert nnMambaSeg(2, 3, **kw).channels_last is None  # default: CUDA inputs, eager mode



@pytest.mark.parametrize("shape,size", [((2, 3, 4, 5, 6), (8, 10, 12)), ((2, 3, 4, 5, 6), (4, 10, 12)),
                                        ((1, 2, 5, 7), (10, 14)), ((1, 2, 3, 4, 5), (3, 4, 5)),
                                        ((1, 2, 3, 4, 5), (5, 8, 10))])
def test_separable_upsampling_equals_interpolate(shape, size):
    """The compiled decoders' per-axis linear doubling gives F.interpolate's values and
    gradients (float64); sizes that are not doublings fall back to F.interpolate."""
    import torch.nn.functional as F

    from nnunet_mamba.networks.blocks import upsample_linear
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ours = upsample_linear(x, size, separable=True)
    ref = F.interpolate(x, size=size, mode="trilinear" if len(size) == 3 else "bilinear", align_corners=False)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               rtol=0, atol=1e-12)
