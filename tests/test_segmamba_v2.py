"""SegMamba-V2 (Xing et al., IEEE TMI 2025): size against the public code, layout, shapes, the
tri-orientated Mamba layer, the trainer, and a 2-iteration run inside nnUNetv2_train."""
from __future__ import annotations

import pytest
import torch

from nnunet_mamba.model_table import brats_plans, count_params
from nnunet_mamba.networks.segmamba import UnetResBlock
from nnunet_mamba.networks.segmamba_v2 import (TRI_AXIS_ORDERS, LargeKernelBlock, SegMambaV2,
                                               TriAxisMamba)
from nnunet_mamba.ssm import Mamba
from tests.test_e2e_nnunet import SMALL_ID, planned_small, run  # noqa: F401  (fixture)
from tests.test_other_segmenters import DATASET_JSON, configuration, trainer_class, trainer_plans

#: The public model class (ge-xing/SegMamba-V2, brats23/models_segmamba/segmambav2.py,
#: ``SegMamba(4, 3)``) counted with mamba-ssm's Mamba parameter shapes: 138,776,775.
PUBLIC_PARAMS_BRATS = 138_776_775
TINY = dict(widths=(8, 16, 24, 32), hidden=40)


@pytest.fixture(autouse=True)
def _nnunet_env(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path))


def test_parameter_count_at_brats_plans_matches_the_public_code():
    pm, cm = configuration(brats_plans())
    with torch.device("meta"):
        net = trainer_class("SegMambaV2Trainer").build_network_architecture(pm, cm, 4, 3, True)
    assert isinstance(net, SegMambaV2)
    assert count_params(net) == PUBLIC_PARAMS_BRATS
    enc = net.encoder
    # by hand: a large-kernel block is 5^3 + 3 x 3^3 + 1 weights per channel pair, 5 biases, SE (C/8)
    c = 384
    lk = c * c * (125 + 3 * 27 + 1) + 5 * c + (c * (c // 8) + c // 8 + (c // 8) * c + c)
    assert count_params(enc.conv_stages[3][0]) == lk
    # mamba-ssm's Mamba(384) (d_inner 768, dt_rank 24, d_state 16) plus the LayerNorm
    d = 768
    mamba = 384 * 2 * d + d * 4 + d + d * (24 + 32) + 24 * d + d + d * 16 + d + d * 384
    assert count_params(enc.mamba_stages[3][0]) == mamba + 2 * 384


def test_mamba_only_in_the_two_deepest_stages_large_kernels_everywhere():
    net = SegMambaV2(4, 3, **TINY)
    enc = net.encoder
    assert [isinstance(m, torch.nn.Identity) for m in enc.mamba_stages] == [True, True, False, False]
    assert [len(s) for s in enc.conv_stages] == [2, 2, 2, 2]
    assert all(isinstance(b, LargeKernelBlock) for s in enc.conv_stages for b in s)
    assert [len(s) for s in enc.mamba_stages[2:]] == [2, 2]
    assert sum(isinstance(m, Mamba) for m in net.modules()) == 4
    assert isinstance(enc.stem_block, UnetResBlock)
    assert [tuple(d.stride) for d in enc.downsamples] == [(2, 2, 2)] * 4
    assert [d.kernel_size for d in enc.downsamples] == [(3, 3, 3)] * 4
    assert [m.kernel_size[0] for m in enc.conv_stages[0][0].deep.modules()
            if isinstance(m, torch.nn.Conv3d)] == [5, 3, 3]


def test_forward_backward_any_size():
    shape = (17, 20, 13)  # padded to 32 x 32 x 16
    torch.manual_seed(0)
    net = SegMambaV2(2, 3, **TINY)
    feats = net.encoder(torch.randn(1, 2, 32, 32, 16))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (8, 32, 32, 16), (8, 16, 16, 8), (16, 8, 8, 4), (24, 4, 4, 2), (32, 2, 2, 1)]
    x = torch.randn(2, 2, *shape, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, *shape) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad.shape == x.shape
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without (finite) gradient: {no_grad[:5]}"
    mamba_grads = [p.grad.abs().sum() for n, p in net.named_parameters() if ".mamba." in n]
    assert len(mamba_grads) == 4 * 9 and all(g > 0 for g in mamba_grads)


def _read(x, axes):
    """(B, C, D, H, W) -> (B, L, C) with spatial axes ``axes`` slowest first (plain torch)."""
    return x.permute(0, *(a + 2 for a in axes), 1).flatten(1, 3)


def _write(seq, shape, axes):
    vol = seq.reshape(seq.shape[0], *[shape[a] for a in axes], seq.shape[-1])
    return vol.permute(0, 4, *[axes.index(i) + 1 for i in range(3)])


def test_tri_axis_mamba_sums_one_mamba_over_three_axis_orders():
    """x + sum over (D,H,W), (H,D,W), (W,H,D) of the same Mamba on the layer-normalised tokens,
    as the public code's ``rearrange`` calls read the map; checked against plain permutes."""
    torch.manual_seed(0)
    layer = TriAxisMamba(6).double()
    assert [o.axes for o in TRI_AXIS_ORDERS] == [(0, 1, 2), (1, 0, 2), (2, 1, 0)]
    x = torch.randn(2, 6, 3, 5, 4, dtype=torch.float64)
    shape = x.shape[2:]
    expected = x.clone()
    for axes in [(0, 1, 2), (1, 0, 2), (2, 1, 0)]:
        expected = expected + _write(layer.mamba(layer.norm(_read(x, axes))), shape, axes)
    torch.testing.assert_close(layer(x), expected)
    assert sum(p.numel() for p in layer.parameters()) == count_params(layer.mamba) + 12


def test_large_kernel_block_residual_and_squeeze_excitation():
    torch.manual_seed(0)
    block = LargeKernelBlock(16).eval()
    x = torch.randn(1, 16, 6, 7, 5)
    inner = block.deep(x) + block.short(x) + x
    weights = block.se.fc(inner.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(block(x), inner * weights[:, :, None, None, None])
    assert block.se.fc[0].out_features == 2  # reduction 8


def test_fue_option_and_no_deep_supervision():
    x = torch.randn(1, 1, 16, 32, 16)  # InstanceNorm needs more than one bottleneck voxel
    torch.manual_seed(0)
    plain = SegMambaV2(1, 2, **TINY)
    torch.manual_seed(0)
    fue = SegMambaV2(1, 2, fue=True, **TINY)
    assert count_params(fue) == count_params(plain)
    assert not torch.allclose(plain(x), fue(x))
    with pytest.raises(ValueError, match="no deep supervision"):
        SegMambaV2(1, 2, deep_supervision=True)


def test_trainer_sgd_poly_without_deep_supervision():
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    cls = trainer_class("SegMambaV2Trainer")
    t = cls(trainer_plans(), "3d_fullres", 0, DATASET_JSON, device=torch.device("cpu"))
    assert t.enable_deep_supervision is False and not isinstance(t._build_loss(), DeepSupervisionWrapper)
    t.network = SegMambaV2(4, 3, **TINY)
    t.set_deep_supervision_enabled(True)
    assert t.network.decoder.deep_supervision is False
    opt, sched = t.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and (t.initial_lr, t.num_epochs) == (1e-2, 1000)
    group = opt.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.99, True, 3e-5)
    sched.step(500)
    assert group["lr"] == pytest.approx(1e-2 * 0.5 ** 0.9)
    for suffix, epochs in (("smoke", 1), ("1epoch", 1), ("5epochs", 5)):
        assert trainer_class(f"SegMambaV2Trainer_{suffix}").hyperparameters["num_epochs"] == epochs


#: SegMambaV2Trainer_smoke with narrow stages, found by nnU-Net through $nnUNet_extTrainer: the full
#: network (138.8 M) takes minutes per smoke epoch on a 2-core CPU and writes 1.1 GB checkpoints.
NARROW_TRAINER = """
from nnunet_mamba_trainers.trainers_segmamba_v2 import SegMambaV2Trainer_smoke


class SegMambaV2Trainer_smokeNarrow(SegMambaV2Trainer_smoke):
    network_kwargs = {"widths": (8, 16, 24, 32), "hidden": 40}
"""


@pytest.mark.slow
def test_two_iterations_inside_nnunetv2_train(planned_small, tmp_path):  # noqa: F811
    work, env = planned_small
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "segmamba_v2_narrow_trainer.py").write_text(NARROW_TRAINER)
    env = {**env, "nnUNet_extTrainer": str(ext)}  # our own trainer folder is appended at start-up
    name = "SegMambaV2Trainer_smokeNarrow"
    out = run(["nnUNetv2_train", str(SMALL_ID), "3d_fullres", "0", "-tr", name, "-device", "cpu"], env)
    assert f"Using trainer '{name}'" in out
    fold = (work / "nnUNet_results" / f"Dataset{SMALL_ID:03d}_Small" / f"{name}__nnUNetPlans__3d_fullres"
            / "fold_0")
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == name and ckpt["current_epoch"] == 1
    weights = ckpt["network_weights"]
    assert weights["decoder.head.weight"].shape[1:] == (8, 1, 1, 1)  # widths[0] = 8: the narrow network
    assert any(k.startswith("encoder.mamba_stages.3.") and k.endswith("mamba.A_log") for k in weights)
    assert not any(k.startswith("encoder.mamba_stages.0.") for k in weights)
    assert (fold / "validation" / "summary.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_size_training_step_under_autocast_on_cuda(dtype):
    """The public setting: 4 inputs, patch 128^3, batch 2, SGD, mixed precision: finite loss and
    gradients, and the peak memory (printed with -s) for the README."""
    torch.manual_seed(0)
    net = SegMambaV2(4, 3).cuda()
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x = torch.randn(2, 4, 128, 128, 128, device="cuda")
    target = (torch.rand(2, 3, 128, 128, 128, device="cuda") > 0.5).float()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)
    if dtype == torch.bfloat16:  # fp16: the GradScaler may skip a step with inf gradients, by design
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    print(f"SegMambaV2 2x4x128^3 {dtype}: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
