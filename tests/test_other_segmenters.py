"""SegMamba, Taming Mambas and U-Mamba: sizes, shapes, deep supervision, layers, trainers."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from nnunet_mamba.model_table import brats_plans, count_params
from nnunet_mamba.networks.from_plans import unet_kwargs_from_plans
from nnunet_mamba.networks.mamba_layers import (BidirectionalMambaBlock, FeatureMapMamba,
                                                PreNormMambaBlock)
from nnunet_mamba.networks.segmamba import (FeatureUncertaintyWeighting, GatedSpatialConv,
                                            SegMamba, TriOrientedMamba)
from nnunet_mamba.networks.taming import (BiSegMamba, MultiSegMamba, SegMambaSkip,
                                          TamingSegMamba)
from nnunet_mamba.networks.umamba import UMambaBot, UMambaEnc
from nnunet_mamba.ssm import (AXIS_PERMUTATIONS, FORWARD, INTER_SLICE, REVERSE, Mamba,
                              MultiScanMamba, SSMBranch, from_sequence, to_sequence)

PLANS_NETWORKS = {  # trainer -> network class, parameters at BraTS plans (public code)
    "TamingSegMambaTrainer": (TamingSegMamba, 61.4e6),
    "BiSegMambaTrainer": (BiSegMamba, 65.0e6),
    "MultiSegMambaTrainer": (MultiSegMamba, 78.2e6),
    "SegMambaSkipTrainer": (SegMambaSkip, 65.0e6),
    "UMambaBotTrainer": (UMambaBot, 42.1e6),
    "UMambaEncTrainer": (UMambaEnc, 42.8e6),
}
TRAINERS = ["SegMambaTrainer", *PLANS_NETWORKS]
# two non-cubic patches; strides (1, 2, 2, (2, 2, 1)) need multiples of (8, 8, 4)
PATCH_A, PATCH_B = (16, 24, 12), (24, 16, 20)
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
DATASET_JSON = {"channel_names": {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"},
                "labels": {"background": 0, "wt": [1, 2, 3], "tc": [1, 3], "et": [3]},
                "regions_class_order": [2, 1, 3], "numTraining": 2, "file_ending": ".nii.gz"}
MAMBA_SSM_KEYS = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                  "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"}


@pytest.fixture(autouse=True)
def _nnunet_env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))


def trainer_plans(patch=(128, 128, 128)) -> dict:
    """BraTS 3d_fullres plans as a trainer reads them."""
    return {**brats_plans(patch), "continue_training": False}


def tiny_plans(patch) -> dict:
    """nnU-Net 3d_fullres plans of a tiny 4-stage U-Net (widths 4..24, BraTS channels),
    anisotropic first kernel and last pooling as nnU-Net plans them for anisotropic data."""
    plans = trainer_plans(patch)
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch.update(n_stages=4, features_per_stage=[4, 8, 16, 24],
                kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 3,
                strides=STRIDES, n_conv_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3)
    return plans


def configuration(plans):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    return pm, pm.get_configuration("3d_fullres")


@functools.lru_cache(maxsize=None)
def trainer_class(name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(name)


@functools.lru_cache(maxsize=None)
def brats_network(cls):
    """The network at BraTS plans, built on the meta device (shapes only: fast)."""
    _, cm = configuration(brats_plans())
    with torch.device("meta"):
        return cls.from_plans(cm, 4, 3, deep_supervision=False)


# ---- sizes -------------------------------------------------------------------------------
def test_segmamba_default_parameter_count():
    with torch.device("meta"):
        n = count_params(SegMamba(4, 4))
    assert 66e6 <= n <= 69e6, n  # public code: 67.4 M at 4 in / 4 out


@pytest.mark.parametrize("trainer", PLANS_NETWORKS)
def test_parameter_counts_at_brats_plans_match_the_public_code(trainer):
    cls, expected = PLANS_NETWORKS[trainer]
    n = count_params(brats_network(cls))
    assert abs(n - expected) < 0.06e6, (cls.__name__, n)


def test_umamba_halves_the_blocks_of_the_deeper_stages_and_enc_uses_channel_tokens():
    bot, enc = brats_network(UMambaBot), brats_network(UMambaEnc)
    assert [len(s) for s in bot.encoder.stages] == [2, 2, 2, 1, 1, 1]
    assert [len(s) for s in bot.decoder.stages] == [2, 2, 2, 1, 1]
    assert [isinstance(m, FeatureMapMamba) for m in bot.encoder.mamba_layers] == [False] * 5 + [True]
    assert all(isinstance(m, FeatureMapMamba) for m in enc.encoder.mamba_layers)
    # 128^3 patch: the 4^3 bottleneck has 64 voxels <= 320 channels -> channels are the tokens
    assert [m.num_voxels for m in enc.encoder.mamba_layers] == [None] * 5 + [64]
    assert bot.encoder.mamba_layers[-1].mixers[0].d_model == 320


# ---- shapes, deep supervision, backward ---------------------------------------------------
@pytest.mark.parametrize("trainer", PLANS_NETWORKS)
@pytest.mark.parametrize("patch,deep_supervision", [(PATCH_A, True), (PATCH_B, False)])
def test_plans_networks_forward_backward(trainer, patch, deep_supervision):
    torch.manual_seed(0)
    cls = trainer_class(trainer)
    pm, cm = configuration(tiny_plans(patch))
    net = cls.build_network_architecture(pm, cm, 4, 3, enable_deep_supervision=deep_supervision)
    assert type(net) is PLANS_NETWORKS[trainer][0]
    assert net.decoder.deep_supervision is deep_supervision
    x = torch.randn(1, 4, *patch)
    out = net(x)
    if deep_supervision:
        t = cls(tiny_plans(patch), "3d_fullres", 0, DATASET_JSON, device=torch.device("cpu"))
        scales = t._get_deep_supervision_scales()
        assert isinstance(out, list) and len(out) == len(scales) == 3
        for o, s in zip(out, scales):
            assert o.shape == (1, 3, *[round(d * f) for d, f in zip(patch, s)])
        loss = sum(o.square().mean() for o in out)
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (1, 3, *patch)
        loss = out.square().mean()
    loss.backward()
    for m in net.encoder.mamba_layers:
        if isinstance(m, FeatureMapMamba):
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    if cls.network_class is UMambaEnc:  # a 2x3x3 bottleneck has fewer voxels than 24 channels
        assert net.encoder.mamba_layers[-1].channel_tokens is (patch == PATCH_A)


@pytest.mark.parametrize("shape", [(20, 24, 18), (17, 30, 12)])
def test_segmamba_forward_backward_any_size_no_deep_supervision(shape):
    torch.manual_seed(0)
    net = SegMamba(4, 3, widths=(4, 8, 16, 32), hidden=32)
    assert net.decoder.deep_supervision is False
    out = net(torch.randn(1, 4, *shape))
    assert out.shape == (1, 3, *shape)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="no deep supervision"):
        SegMamba(4, 3, widths=(4, 8, 16, 32), hidden=32, deep_supervision=True)


# ---- layers ------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [FORWARD, REVERSE, INTER_SLICE, AXIS_PERMUTATIONS[4]])
def test_feature_map_mamba_reads_the_map_in_the_scan_order(order):
    torch.manual_seed(0)
    mixer = Mamba(6)
    layer = FeatureMapMamba(6, [mixer], [order])
    x = torch.randn(2, 6, 3, 5, 4)
    seq = layer.norm(to_sequence(x, order))
    expected = from_sequence(mixer(seq), x.shape[2:], order)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_tri_oriented_mamba_three_branches_one_projection_and_residual():
    torch.manual_seed(0)
    layer = TriOrientedMamba(6)
    assert layer.orders == (FORWARD, REVERSE, INTER_SLICE) and layer.residual
    assert isinstance(layer.mamba, MultiScanMamba) and len(layer.mamba.branches) == 3
    x = torch.randn(1, 6, 4, 3, 5)
    seq = layer.norm(to_sequence(x))
    perms = [None] + [o.permutation(x.shape[2:]) for o in (REVERSE, INTER_SLICE)]
    expected = x + from_sequence(layer.mamba(seq, perms), x.shape[2:])
    torch.testing.assert_close(layer(x), expected)
    # inter-slice: depth varies fastest, computed from the actual size
    assert INTER_SLICE.permutation((4, 3, 5))[:4].tolist() == [0, 15, 30, 45]


def test_feature_uncertainty_weighting_follows_the_paper():
    fue = FeatureUncertaintyWeighting()
    x = torch.tensor([1.0, -1.0, 3.0, -3.0]).reshape(1, 4, 1, 1, 1)  # channel mean 0
    u = 0.5 * torch.log(torch.tensor(2.0))  # p = 0.5, u = -p log p
    torch.testing.assert_close(fue(x), x * (2 - u))
    y = torch.full((1, 2, 1, 1, 1), 50.0)  # p -> 1: certain, u -> 0, weight -> 2
    torch.testing.assert_close(fue(y), 2 * y)


def test_gated_spatial_convolution_gate_modes():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 6, 7)
    gsc = GatedSpatialConv(4)
    s, p = gsc.spatial(x), gsc.pointwise(x)
    torch.testing.assert_close(gsc(x), x + gsc.proj(s * p))
    gsc.gate = "add"
    torch.testing.assert_close(gsc(x), x + gsc.proj(s + p))
    with pytest.raises(ValueError, match="multiply"):
        GatedSpatialConv(4, gate="max")


def test_taming_layers_follow_the_public_code():
    uni, bi = brats_network(TamingSegMamba), brats_network(BiSegMamba)
    multi = brats_network(MultiSegMamba)
    layer = uni.encoder.mamba_layers[5]
    assert isinstance(layer.mixers[0], PreNormMambaBlock) and layer.norm is not None
    assert layer.mixers[0].mamba.d_state == 256  # min(C, 256) at C = 320
    assert isinstance(bi.encoder.mamba_layers[0].mixers[0], BidirectionalMambaBlock)
    m = multi.encoder.mamba_layers[2]
    assert m.norm is None and len(m.mixers) == 4
    assert [o.axes for o in m.orders] == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (2, 0, 1)]
    assert m.mixers[0].fwd_mamba.mamba.d_state == 64
    assert m.mixers[0].fwd_mamba is not m.mixers[1].fwd_mamba


@pytest.mark.parametrize("cls,next_stage_sees_mamba", [(TamingSegMamba, True), (SegMambaSkip, False)])
def test_mamba_in_the_main_path_or_only_on_the_skips(cls, next_stage_sees_mamba):
    _, cm = configuration(tiny_plans(PATCH_A))
    net = cls.from_plans(cm, 4, 3, deep_supervision=True).eval()
    seen = {}
    net.encoder.stages[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    net.encoder.stages[0].register_forward_hook(lambda m, a, o: seen.__setitem__("conv", o))
    with torch.no_grad():
        skips = net.encoder(torch.randn(1, 4, *PATCH_A))
        mamba0 = net.encoder.mamba_layers[0](seen["conv"])
    torch.testing.assert_close(skips[0], mamba0)
    assert torch.equal(seen["in"], skips[0]) is next_stage_sees_mamba
    assert torch.equal(seen["in"], seen["conv"]) is not next_stage_sees_mamba


def test_mamba_layers_run_in_float32_under_autocast():
    torch.manual_seed(0)
    layer = FeatureMapMamba(4, [PreNormMambaBlock(4)])
    x = torch.randn(1, 4, 3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x.bfloat16().float()))


def test_every_mamba_module_has_mamba_ssm_parameter_names():
    _, cm = configuration(tiny_plans(PATCH_A))
    nets = [c.from_plans(cm, 4, 3) for c, _ in PLANS_NETWORKS.values()]
    nets.append(SegMamba(4, 3, widths=(4, 8, 16, 32), hidden=32))
    for net in nets:
        mambas = [m for m in net.modules() if isinstance(m, Mamba)]
        multi = [m for m in net.modules() if isinstance(m, MultiScanMamba)]
        assert mambas or multi, type(net).__name__
        for m in mambas:
            assert set(m.state_dict()) == MAMBA_SSM_KEYS
        for m in multi:  # shared projections + one mamba_ssm-named scan branch per order
            keys = set(m.state_dict())
            assert {"in_proj.weight", "out_proj.weight"} <= keys
            for b in m.branches:
                assert isinstance(b, SSMBranch)
                assert set(b.state_dict()) == MAMBA_SSM_KEYS - {"in_proj.weight", "out_proj.weight"}


def test_channel_token_layer_refuses_another_patch_size():
    _, cm = configuration(tiny_plans(PATCH_A))
    net = UMambaEnc.from_plans(cm, 4, 3, deep_supervision=False)
    with pytest.raises(ValueError, match="patch size of the plans"):
        net(torch.randn(1, 4, 24, 24, 12))


def test_plans_must_be_2d_or_3d():  # 2D plans: tests/test_configurations.py
    plans = tiny_plans(PATCH_A)
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["conv_op"] = "torch.nn.modules.conv.Conv1d"
    _, cm = configuration(plans)
    with pytest.raises(ValueError, match="Conv2d or Conv3d"):
        unet_kwargs_from_plans(cm)


# ---- trainers ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_found_by_nnunet_with_its_short_variants(name):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    cls = trainer_class(name)
    assert cls is not None and issubclass(cls, nnUNetTrainer) and cls.__name__ == name
    for suffix in ("1epoch", "5epochs", "smoke", "demo"):
        variant = trainer_class(f"{name}_{suffix}")  # each lookup re-imports the module
        assert variant is not None and name in [c.__name__ for c in variant.__mro__]
    assert trainer_class(f"{name}_smoke").hyperparameters["num_iterations_per_epoch"] == 2


def test_segmamba_trainer_sgd_without_deep_supervision():
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    cls = trainer_class("SegMambaTrainer")
    pm, cm = configuration(brats_plans())
    net = cls.build_network_architecture(pm, cm, 4, 3, enable_deep_supervision=True)
    assert isinstance(net, SegMamba) and net.decoder.deep_supervision is False
    t = cls(trainer_plans(), "3d_fullres", 0, DATASET_JSON, device=torch.device("cpu"))
    assert t.enable_deep_supervision is False and t._get_deep_supervision_scales() is None
    assert not isinstance(t._build_loss(), DeepSupervisionWrapper)
    t.network = net
    t.set_deep_supervision_enabled(True)  # nnU-Net calls it; must stay off
    assert net.decoder.deep_supervision is False
    opt, _ = t.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and (t.initial_lr, t.num_epochs) == (1e-2, 1000)


@pytest.mark.parametrize("name,epochs,lrs", [
    ("TamingSegMambaTrainer", 1000, {0: 3e-4, 50: 1.525e-4, 100: 5e-6, 200: 3e-4}),
    ("BiSegMambaTrainer", 300, {0: 3e-4, 100: 5e-6}),
    ("SegMambaSkipTrainer", 1000, {0: 3e-4, 100: 5e-6}),
    ("MultiSegMambaTrainer", 300, {0: 1.2e-5, 29: 3e-4, 299: 1.2e-13}),
    ("UMambaBotTrainer", 1000, {0: 1e-2}),
    ("UMambaEncTrainer", 1000, {0: 1e-2}),
])
def test_trainer_optimiser_and_schedule(name, epochs, lrs):
    cls = trainer_class(name)
    plans = tiny_plans(PATCH_A)
    pm, cm = configuration(plans)
    t = cls(plans, "3d_fullres", 0, DATASET_JSON, device=torch.device("cpu"))
    assert t.num_epochs == epochs and t.enable_deep_supervision
    t.network = cls.build_network_architecture(pm, cm, 4, 3, True)
    opt, sched = t.configure_optimizers()
    expected_opt = torch.optim.SGD if name.startswith("UMamba") else torch.optim.RAdam
    assert type(opt) is expected_opt and opt.param_groups[0]["weight_decay"] == 3e-5
    for epoch, lr in lrs.items():
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-6), epoch


def test_one_cycle_schedule_equals_torch_one_cycle():
    one_cycle_lr = trainer_class("MultiSegMambaTrainer").configure_optimizers.__globals__["one_cycle_lr"]
    p = [torch.nn.Parameter(torch.zeros(1))]
    for total in (300, 8, 1):
        opt = torch.optim.SGD(p, 3e-4)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=total,
                                                  pct_start=0.1, final_div_factor=1e8)
        for step in range(total):
            assert one_cycle_lr(3e-4, step, total) == pytest.approx(opt.param_groups[0]["lr"])
            opt.step()
            if step < total - 1:
                ref.step()


def test_tiny_plans_are_not_changed_by_building():
    plans = tiny_plans(PATCH_A)
    before = copy.deepcopy(plans)
    _, cm = configuration(plans)
    UMambaEnc.from_plans(cm, 4, 3)
    assert plans == before
