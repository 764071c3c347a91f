"""The sync-free training step gives nnU-Net's step's numbers (CPU; the speed is measured on a
GPU by scripts/profile_epoch.py --diagnose)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_mamba.training.sync_free_step import (ENV, GRAPHS_ENV, cuda_graphs_setting, supports_fused,
                                                  sync_free_setting)
from tests.test_nnmamba_seg import _plans
from tests.test_other_segmenters import tiny_plans

PATCH = (16, 24, 32)
PLANS = {"nnMambaTrainer": lambda: _plans(PATCH), "nnUNetTrainer_GPUAug": lambda: tiny_plans(PATCH)}

DATASET_JSON = {"channel_names": {"0": "a", "1": "b", "2": "c", "3": "d"},
                "labels": {"background": 0, "wt": [1, 2, 3], "tc": [1, 3], "et": [3]},
                "regions_class_order": [2, 1, 3], "numTraining": 1, "file_ending": ".nii.gz"}


def test_setting_follows_device_class_and_environment(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ENV, raising=False)
    assert sync_free_setting(cuda) and not sync_free_setting(cpu)
    assert not sync_free_setting(cuda, class_setting=False) and sync_free_setting(cpu, class_setting=True)
    monkeypatch.setenv(ENV, "0")
    assert not sync_free_setting(cuda) and not sync_free_setting(cpu, class_setting=True)
    monkeypatch.setenv(ENV, "1")
    assert sync_free_setting(cpu) and not sync_free_setting(cuda, class_setting=False)
    assert supports_fused(torch.optim.Adam) and not supports_fused(torch.optim.RAdam)
    monkeypatch.delenv(GRAPHS_ENV, raising=False)  # CUDA graphs: experimental, opt-in, CUDA only
    assert not cuda_graphs_setting(cuda) and cuda_graphs_setting(cuda, class_setting=True)
    monkeypatch.setenv(GRAPHS_ENV, "1")
    assert cuda_graphs_setting(cuda) and not cuda_graphs_setting(cpu)
    assert not cuda_graphs_setting(cuda, class_setting=False)
    monkeypatch.setenv(GRAPHS_ENV, "0")
    assert not cuda_graphs_setting(cuda, class_setting=True)


def _trainer(name: str, sync_free: str, monkeypatch, tmp_path, state=None, fused=None, dataset_json=None):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv(ENV, sync_free)
    cls = recursive_find_trainer_class_by_name(name)
    trainer = cls(PLANS[name](), "3d_fullres", 0, dataset_json or DATASET_JSON, device=torch.device("cpu"))
    pm = PlansManager(PLANS[name]())
    torch.manual_seed(0)
    trainer.network = cls.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 4, 3, True)
    if state is not None:
        trainer.network.load_state_dict(state)
    if fused is not None:
        monkeypatch.setenv(ENV, fused)  # the optimiser the other setting builds
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)  # the CUDA path's calls
    return trainer


@pytest.mark.parametrize("name", ["nnMambaTrainer", "nnUNetTrainer_GPUAug"])
def test_sync_free_step_equals_nnunets_step(name, monkeypatch, tmp_path):
    """Two steps of each on the same batches and the same (fused) optimiser: the same losses
    (logged mean included) and the same weights. (Fused and unfused Adam differ in rounding,
    which Adam's division by sqrt(v) magnifies where gradients are tiny, so the step is
    compared with one optimiser; the trainers' choice of optimiser is checked apart.)"""
    ours = _trainer(name, "1", monkeypatch, tmp_path / "a")
    theirs = _trainer(name, "0", monkeypatch, tmp_path / "b", state=ours.network.state_dict(), fused="1")
    plain = _trainer(name, "0", monkeypatch, tmp_path / "c")
    assert ours.optimizer.defaults.get("fused") and not plain.optimizer.defaults.get("fused")
    assert type(ours.optimizer) is type(plain.optimizer)
    assert ours.training_network is ours.network  # no CUDA graphs on a CPU
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *PATCH, generator=g)
    with torch.no_grad():
        shapes = [o.shape for o in ours.network(x)]
    outputs = {"ours": [], "theirs": []}
    for step in range(2):
        batch = {"data": x + step, "target": [(torch.rand(s, generator=g) > 0.5).float() for s in shapes]}
        monkeypatch.setenv(ENV, "1")
        outputs["ours"].append(ours.train_step({k: [t.clone() for t in v] if isinstance(v, list) else v.clone()
                                                 for k, v in batch.items()}))
        monkeypatch.setenv(ENV, "0")
        outputs["theirs"].append(theirs.train_step(batch))
    assert isinstance(outputs["ours"][0]["loss"], torch.Tensor)  # no host copy per step
    assert isinstance(outputs["theirs"][0]["loss"], np.ndarray)
    ours_loss = [float(o["loss"]) for o in outputs["ours"]]
    theirs_loss = [float(o["loss"]) for o in outputs["theirs"]]
    np.testing.assert_allclose(ours_loss, theirs_loss, rtol=1e-5)
    assert ours_loss[0] != ours_loss[1]
    for (n, p), q in zip(ours.network.named_parameters(), theirs.network.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    monkeypatch.setenv(ENV, "1")
    ours.on_train_epoch_end(outputs["ours"])
    monkeypatch.setenv(ENV, "0")
    theirs.on_train_epoch_end(outputs["theirs"])
    np.testing.assert_allclose(ours.logger.get_value("train_losses", step=None),
                               theirs.logger.get_value("train_losses", step=None), rtol=1e-6)
    np.testing.assert_allclose(ours.logger.get_value("train_losses", step=None)[0], np.mean(theirs_loss),
                               rtol=1e-6)


LABELS_WITH_IGNORE = {**DATASET_JSON, "labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}
LABELS_WITH_IGNORE.pop("regions_class_order")
REGIONS_WITH_IGNORE = {**DATASET_JSON, "labels": {**DATASET_JSON["labels"], "ignore": 4}}


@pytest.mark.parametrize("case", ["regions", "labels with ignore", "regions with ignore"])
def test_sync_free_validation_equals_nnunets(case, monkeypatch, tmp_path):
    """Validation batches through both steps: the same loss and pseudo-Dice counts, and the
    same logged validation loss and Dice once the epoch's results are read at once."""
    dataset_json = {"regions": DATASET_JSON, "labels with ignore": LABELS_WITH_IGNORE,
                    "regions with ignore": REGIONS_WITH_IGNORE}[case]
    ours = _trainer("nnMambaTrainer", "1", monkeypatch, tmp_path / "a", dataset_json=dataset_json)
    theirs = _trainer("nnMambaTrainer", "0", monkeypatch, tmp_path / "b", state=ours.network.state_dict(),
                      dataset_json=dataset_json)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # an untrained network predicts one class everywhere: spread its predictions
        bias = torch.randn(ours.network.decoder.seg_head.bias.shape, generator=g)
    for t in (ours, theirs):
        t.network.eval()
        with torch.no_grad():
            t.network.decoder.seg_head.bias.copy_(bias)
            t.network.decoder.seg_head.weight.mul_(10)
    shapes = [(2, *[p // 2 ** k for p in PATCH]) for k in range(4)]
    outputs = {"ours": [], "theirs": []}
    for _ in range(2):
        x = torch.randn(2, 4, *PATCH, generator=g)
        if case == "labels with ignore":  # label maps, 3 = ignore
            target = [torch.randint(0, 4, (s[0], 1, *s[1:]), generator=g).float() for s in shapes]
        else:  # region channels (+ the ignore channel)
            channels = 3 + (case == "regions with ignore")
            target = [(torch.rand(s[0], channels, *s[1:], generator=g) > 0.5).float() for s in shapes]
        with torch.no_grad():
            for who, t, env in (("ours", ours, "1"), ("theirs", theirs, "0")):
                monkeypatch.setenv(ENV, env)
                outputs[who].append(t.validation_step({"data": x.clone(), "target": [y.clone() for y in target]}))
    assert all(isinstance(v, torch.Tensor) for o in outputs["ours"] for v in o.values())  # no host copy per step
    for a, b in zip(outputs["ours"], outputs["theirs"]):
        assert set(a) == set(b)
        for k in b:
            np.testing.assert_allclose(a[k].numpy(), b[k], rtol=1e-6, err_msg=k)
    assert float(np.sum(outputs["theirs"][0]["tp_hard"])) > 0
    for who, t, env in (("ours", ours, "1"), ("theirs", theirs, "0")):
        monkeypatch.setenv(ENV, env)
        t.on_validation_epoch_end(outputs[who])
    for key in ("val_losses", "mean_fg_dice", "dice_per_class_or_region"):
        np.testing.assert_allclose(ours.logger.get_value(key, step=None), theirs.logger.get_value(key, step=None),
                                   rtol=1e-6, err_msg=key)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphed_steps_follow_the_compiled_steps(monkeypatch, tmp_path):
    """On CUDA with nnU-Net's compile: the training step replays CUDA graphs of the same
    module; across an epoch boundary (3 steps, an eval-mode validation forward of nnU-Net's
    compiled network, 3 more steps) the losses, the BatchNorm running statistics and the
    eval-mode output equal those of the plain compiled network (fp16 autocast: close, not
    bitwise). The H200 run that made CUDA graphs opt-in went wrong exactly there."""
    runs = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("NNUNET_MAMBA_CUDA_GRAPHS", graphs)
        t = _trainer("nnMambaTrainer", "1", monkeypatch, tmp_path / graphs)
        t.device = torch.device("cuda")
        t.network = torch.compile(t.network.cuda())
        t.optimizer, _ = t.configure_optimizers()
        t.loss = t._build_loss()
        t.grad_scaler = torch.amp.GradScaler("cuda")
        assert (t.training_network is not t.network) == (graphs == "1")
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, 4, *PATCH, generator=g).cuda()
        shapes = [(2, 3, *[p // 2 ** k for p in PATCH]) for k in range(4)]
        losses, evals = [], []
        for step in range(6):
            target = [(torch.rand(s, generator=g) > 0.5).float().cuda() for s in shapes]
            losses.append(float(t.train_step({"data": x + step, "target": target})["loss"]))
            if step in (2, 5):  # an epoch's end: nnU-Net's validation forward
                t.network.eval()
                with torch.no_grad(), torch.autocast("cuda"):
                    evals.append(t.network(x)[0].float().cpu())
                t.network.train()
        stats = {n: b.detach().float().cpu() for n, b in t.network._orig_mod.named_buffers() if "running" in n}
        runs[graphs] = (losses, evals, stats)
    (l1, e1, s1), (l0, e0, s0) = runs["1"], runs["0"]
    np.testing.assert_allclose(l1, l0, rtol=2e-3)
    assert len(set(l1)) == 6  # the weights moved between the steps
    for n in s0:
        torch.testing.assert_close(s1[n], s0[n], rtol=1e-2, atol=1e-3, msg=lambda m: f"{n}: {m}")
    for a, b in zip(e1, e0):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_batchnorm_statistics_are_re_estimated_after_graphed_steps(monkeypatch, tmp_path):
    """Late in a run the EMA statistics are kept, unless steps ran as CUDA graphs: then the
    plain module re-estimates them (stale or overwritten values are replaced)."""
    t = _trainer("nnMambaTrainer", "1", monkeypatch, tmp_path)
    g = torch.Generator().manual_seed(3)
    batches = iter([{"data": torch.randn(2, 4, *PATCH, generator=g)} for _ in range(t.bn_recalibration_batches)])
    t.dataloader_train = batches
    t.current_epoch = 10  # 2750 iterations done: past bn_recalibration_iterations
    norms = [m for m in t.network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.running_mean.fill_(1e3)
    assert not t.recalibrate_batchnorm()
    assert all(bool((m.running_mean == 1e3).all()) for m in norms)
    t.graphed_steps = 250
    assert t.recalibrate_batchnorm()
    assert all(bool((m.running_mean.abs() < 1e3).all()) for m in norms)
    assert all(float(m.init_share) == 0.0 for m in norms if hasattr(m, "init_share"))
