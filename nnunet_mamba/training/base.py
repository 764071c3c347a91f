"""The base of every nnunet-mamba trainer: nnU-Net's own trainer with a network chosen by
the subclass and its optimiser settings as class attributes.

A trainer only says *which* network and *which* hyperparameters::

    class nnMambaTrainer(MambaTrainerBase):
        network_class = nnMambaSeg
        optimizer_name = "adam"
        hyperparameters = {"initial_lr": 2e-3, "weight_decay": 1e-3, "num_epochs": 100}

``hyperparameters`` are merged along the class hierarchy (:class:`HyperparameterMixin`): a
subclass states only what it changes. Mamba's ``A_log`` and ``D`` get no weight decay
(:func:`nnunet_mamba.runkit.optim.parameter_groups`, as mamba-ssm).

Everything else (planning, preprocessing, data loading, augmentation, splits, validation,
checkpoints, ``--c``, prediction, ensembling) is nnU-Net's. The network is built by
:meth:`build_network_architecture` (nnU-Net >= 2.7 signature; a classmethod so that the
predictor, which calls it on the class, builds the same network). Networks that do not
follow nnU-Net's pooling for deep supervision declare their output scales with an
attribute ``ds_scales`` (relative resolutions, finest first: one number, or one per axis for
anisotropic pooling); networks without deep supervision set ``supports_deep_supervision =
False`` on the trainer.

Configurations: every trainer builds its network from the configuration's plans (``2d``,
``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``). A network that cannot serve a
configuration raises ``PlansConfigurationError`` while it is built; :meth:`initialize` (the
first thing ``nnUNetv2_train`` does, before any data is loaded) turns it into an error naming
the trainer, the configuration and the alternatives.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
from typing import Any, ClassVar, Optional

import torch
from torch import nn

MIN_NNUNETV2 = (2, 8)


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_nnunetv2(version: Optional[str] = None) -> str:
    """Raise a clear error when the installed nnunetv2 is older than 2.8."""
    if version is None:
        try:
            version = importlib.metadata.version("nnunetv2")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError("nnunet-mamba trainers need nnunetv2: pip install 'nnunetv2>=2.8'") from None
    if _parse(version) < MIN_NNUNETV2:
        raise ImportError(
            f"nnunet-mamba trainers need nnunetv2>=2.8 but nnunetv2 {version} is installed: its "
            "trainer lookup and build_network_architecture signature differ. "
            "Fix: pip install -U 'nnunetv2>=2.8'")
    return version


require_nnunetv2()

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

from nnunet_mamba.runkit.optim import accept_single_group_states, make_optimizer, optimizer_class  # noqa: E402
from nnunet_mamba.training.gpu_augmentation_trainer import GPUAugmentationMixin  # noqa: E402
from nnunet_mamba.training.sync_free_step import SyncFreeStepMixin  # noqa: E402


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    if hasattr(network, "module") and isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


class HyperparameterMixin:
    """``hyperparameters``: overrides of nnU-Net's instance attributes (``initial_lr``,
    ``weight_decay``, ``num_epochs``, ``num_iterations_per_epoch``, ...), merged along the
    class hierarchy: a subclass's dict updates its bases', so it states only what it changes
    (``cls.hyperparameters`` is the merged dict). ``inference_mirroring``: mirroring
    test-time augmentation in validation and prediction (nnU-Net: on)."""

    hyperparameters: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("hyperparameters", {}))
        cls.hyperparameters = merged

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.inference_mirroring = True
        for name, value in self.hyperparameters.items():
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__}: unknown hyperparameter {name!r}")
            setattr(self, name, value)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.inference_mirroring:
            self.inference_allowed_mirroring_axes = None  # stored in the checkpoint
        return out


class MambaTrainerBase(HyperparameterMixin, SyncFreeStepMixin, GPUAugmentationMixin, nnUNetTrainer):
    """nnU-Net trainer whose network and optimiser settings come from class attributes.

    Subclasses set ``network_class`` (called as ``network_class(in_channels, num_classes,
    deep_supervision=..., **network_kwargs)``, or ``network_class.from_plans(
    configuration_manager, in_channels, num_classes, deep_supervision, **network_kwargs)``
    when the class builds itself from the plans) or override :meth:`build_network`;
    ``supports_deep_supervision = False`` for networks with one output; ``optimizer_name``
    ('sgd', 'adam', 'adamw', 'radam'); and ``hyperparameters`` (see
    :class:`HyperparameterMixin`), e.g. ``{"initial_lr": 2e-3, "num_epochs": 100}``.
    On CUDA the training step does not wait for the GPU (:class:`SyncFreeStepMixin`) and
    the training augmentation runs there (:class:`GPUAugmentationMixin`).
    """

    network_class: ClassVar[Optional[type]] = None
    network_kwargs: ClassVar[dict[str, Any]] = {}
    supports_deep_supervision: ClassVar[bool] = True
    optimizer_name: ClassVar[str] = "sgd"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not self.supports_deep_supervision:
            self.enable_deep_supervision = False

    # ---- network -------------------------------------------------------------------------
    @classmethod
    def build_network(cls, plans_manager, configuration_manager, num_input_channels: int,
                      num_output_channels: int, enable_deep_supervision: bool) -> nn.Module:
        if cls.network_class is None:
            raise NotImplementedError(f"{cls.__name__} sets no network_class")
        if hasattr(cls.network_class, "from_plans"):  # networks built on the plans' U-Net
            return cls.network_class.from_plans(configuration_manager, num_input_channels,
                                                num_output_channels, enable_deep_supervision,
                                                **cls.network_kwargs)
        return cls.network_class(num_input_channels, num_output_channels,
                                 deep_supervision=enable_deep_supervision, **cls.network_kwargs)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return cls.build_network(plans_manager, configuration_manager, num_input_channels,
                                 num_output_channels,
                                 enable_deep_supervision and cls.supports_deep_supervision)

    def initialize(self):
        from nnunet_mamba.networks.from_plans import PlansConfigurationError
        try:
            super().initialize()
        except PlansConfigurationError as e:
            raise PlansConfigurationError(
                f"{type(self).__name__} cannot train configuration {self.configuration_name!r} of "
                f"plans {self.plans_manager.plans_name!r} (dataset {self.plans_manager.dataset_name}): "
                f"{e}. Alternatives: another configuration of these plans (nnUNetv2_train ... "
                f"<configuration> -tr {type(self).__name__}), or a trainer that builds any plans' "
                "U-Net, e.g. UMambaBotTrainer or nnU-Net's nnUNetTrainer") from None

    # ---- BatchNorm statistics (nnMamba) -------------------------------------------------
    #: training iterations below which BatchNorm statistics are re-estimated before validation
    bn_recalibration_iterations: ClassVar[int] = 100
    #: training batches those statistics are re-estimated on (at most one epoch's)
    bn_recalibration_batches: ClassVar[int] = 8

    def on_validation_epoch_start(self):
        self.recalibrate_batchnorm()
        super().on_validation_epoch_start()

    def recalibrate_batchnorm(self, force: bool = False) -> bool:
        """Re-estimate BatchNorm running statistics with the current weights (issue 13).

        BatchNorm's running statistics are averages over past training forward passes, i.e.
        over *past weights*. Early in training (Adam's first steps change every weight by
        ~lr, tens of percent of a layer's output) they do not describe the current network:
        after two iterations nnMamba's eval-mode logits reached 1e9 and nnU-Net's predictor
        aborted on inf. So while fewer than ``bn_recalibration_iterations`` training
        iterations have run (or with ``force``), the statistics are recomputed before each
        validation as a cumulative average over ``bn_recalibration_batches`` training
        batches (at most one epoch's) in train mode without gradients ("precise BN", Wu &
        Johnson 2021). Validation, checkpoints and prediction then use sound statistics.
        Later runs keep PyTorch's EMA (the paper's BatchNorm), at no cost. Networks without
        BatchNorm are untouched. Returns whether the statistics were re-estimated.
        """
        if self.network is None:
            return False
        net = unwrap(self.network)
        norms = [m for m in net.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        done = self.current_epoch * self.num_iterations_per_epoch + self.num_iterations_per_epoch
        # steps replayed as CUDA graphs (experimental) may leave the running statistics stale
        force = force or getattr(self, "graphed_steps", 0) > 0
        if not norms or (not force and done >= self.bn_recalibration_iterations):
            return False
        loader = getattr(self, "dataloader_train", None)
        if loader is None:
            return False
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            if hasattr(m, "init_share"):
                m.init_share.fill_(1.0)
            m.momentum = None  # cumulative average over the batches below
        was_training = net.training
        net.train()
        amp = (torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda"
               else contextlib.nullcontext())
        try:
            with torch.no_grad(), amp:
                for _ in range(max(1, min(self.bn_recalibration_batches,
                                          self.num_iterations_per_epoch))):
                    net(next(loader)["data"].to(self.device, non_blocking=True))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            net.train(was_training)
        self.print_to_log_file(f"BatchNorm statistics re-estimated on the current weights "
                               f"({len(norms)} layers) before validation")
        return True

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        scales = getattr(unwrap(self.network), "ds_scales", None) if self.network is not None else None
        if scales is None:
            return super()._get_deep_supervision_scales()
        dim = len(self.configuration_manager.patch_size)
        return [[float(v) for v in s] if isinstance(s, (list, tuple)) else [float(s)] * dim
                for s in scales]

    def set_deep_supervision_enabled(self, enabled: bool):
        if not self.supports_deep_supervision:
            return
        super().set_deep_supervision_enabled(enabled)

    # ---- optimiser -----------------------------------------------------------------------
    def configure_optimizers(self):
        """``optimizer_name`` at ``initial_lr`` (SGD: nnU-Net's momentum 0.99, Nesterov) with
        ``weight_decay`` except on Mamba's ``A_log`` and ``D``; nnU-Net's poly schedule.
        Checkpoints of earlier versions (one parameter group) still resume."""
        name = self.optimizer_name
        try:
            cls = optimizer_class(name)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
        extra = {"momentum": 0.99, "nesterov": True} if name == "sgd" else {}
        extra.update(self.optimizer_options(cls))  # fused on CUDA (sync-free step)
        opt = make_optimizer(name, self.network, self.initial_lr, self.weight_decay, **extra)
        accept_single_group_states(opt, self.network)  # resuming runs of earlier versions
        return opt, PolyLRScheduler(opt, self.initial_lr, self.num_epochs)


#: short variants made for every trainer (nnU-Net's naming: ``<Trainer>_1epoch`` ...)
SHORT_VARIANTS: dict[str, dict[str, Any]] = {
    "1epoch": {"num_epochs": 1},
    # scripts/bench_nnunet_gpu.sh times the second epoch (torch.compile amortised)
    "2epochs": {"num_epochs": 2},
    "5epochs": {"num_epochs": 5},
    # a few CPU iterations for tests and CI: 1 epoch of 2 training and 1 validation batches
    "smoke": {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
              "inference_mirroring": False},
    # the CPU demo: 8 short epochs
    "demo": {"num_epochs": 8, "num_iterations_per_epoch": 12, "num_val_iterations_per_epoch": 2},
}


def short_variants(trainer: type, module: str) -> dict[str, type]:
    """``{name: class}`` of the short variants of ``trainer`` (put them in a module's globals)."""
    out = {}
    for suffix, overrides in SHORT_VARIANTS.items():
        name = f"{trainer.__name__}_{suffix}"
        out[name] = type(name, (trainer,), {"hyperparameters": dict(overrides), "__module__": module,
                                             "__doc__": f"{trainer.__name__} with {overrides}."})
    return out
