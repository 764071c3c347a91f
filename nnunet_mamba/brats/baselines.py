"""The rows of ``nnmamba brats2023 reproduce``: which trainer is trained on which plans.

Each ``--trainers`` entry is one row of the table:

* ``TRAINER``: the trainer class on the run's plans (``--plans``, with ``--preset`` applied),
  e.g. ``nnMambaTrainer``, ``nnUNetTrainer``.
* ``TRAINER:PLANS``: the trainer on its own plans identifier, e.g.
  ``nnUNetTrainer:nnUNetResEncUNetMPlans``.
* A named baseline of :data:`BASELINES`: ``nnUNetTrainer_ResEncM`` / ``_ResEncL`` / ``_ResEncXL``
  are nnU-Net's own trainer on nnU-Net's residual-encoder preset plans (Isensee et al.,
  "nnU-Net Revisited", MICCAI 2024, Sec. 4 and Table 2; the plans its planners
  ``nnUNetPlannerResEncM`` / ``L`` / ``XL`` write for 8 / 24 / 40 GB of GPU memory). These
  names are reproduce's, not trainer classes: ``nnUNetv2_train`` runs ``-tr nnUNetTrainer -p
  nnUNetResEncUNetMPlans``.

Plans named by an entry are used as nnU-Net planned them: ``--preset`` changes only the run's
``--plans`` (a preset patch would turn ResEnc L into ResEnc M, whose difference is the patch
and batch size that the GPU-memory target gives). Every row is trained on the same split.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

#: nnU-Net planner (``-pl``) that writes each plans identifier; reproduce plans these itself.
PLANNERS = {
    "nnUNetPlans": "ExperimentPlanner",
    "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
    "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL",
    "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL",
}

#: named baselines: entry -> (trainer class, plans identifier, row label)
BASELINES = {
    "nnUNetTrainer_ResEncM": ("nnUNetTrainer", "nnUNetResEncUNetMPlans", "nnU-Net ResEnc M"),
    "nnUNetTrainer_ResEncL": ("nnUNetTrainer", "nnUNetResEncUNetLPlans", "nnU-Net ResEnc L"),
    "nnUNetTrainer_ResEncXL": ("nnUNetTrainer", "nnUNetResEncUNetXLPlans", "nnU-Net ResEnc XL"),
}


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-." for c in name)


@dataclass(frozen=True)
class TrainerSpec:
    """One ``--trainers`` entry: ``trainer`` (``-tr``) on ``plans`` (``-p``; None: the run's
    plans), shown as ``label``; ``key`` names its folders and logs."""

    given: str
    trainer: str
    plans: str | None
    label: str

    @property
    def key(self) -> str:
        return self.given if self.plans is None or self.given in BASELINES else f"{self.trainer}__{self.plans}"

    def plans_id(self, run_plans: str) -> str:
        """The plans identifier this row trains on, given the run's (preset-applied) plans."""
        return self.plans if self.plans is not None else run_plans


def parse_trainer_spec(text: str) -> TrainerSpec:
    """``TRAINER``, ``TRAINER:PLANS`` or a name of :data:`BASELINES`; raises :class:`UserError`."""
    if text in BASELINES:
        return TrainerSpec(text, *BASELINES[text])
    trainer, sep, plans = text.partition(":")
    if not _valid_name(trainer) or (sep and not _valid_name(plans)):
        raise UserError(f"--trainers entry {text!r} is not TRAINER, TRAINER:PLANS (e.g. "
                        f"nnUNetTrainer:nnUNetResEncUNetMPlans) or one of {', '.join(BASELINES)}; "
                        "names hold letters, digits, '_', '-' and '.'")
    if not sep:
        return TrainerSpec(text, text, None, text)
    return TrainerSpec(text, trainer, plans, f"{trainer} ({plans})")


def parse_trainer_specs(entries, run_plans: str, preset: str | None = None) -> list[TrainerSpec]:
    """Every ``--trainers`` entry parsed; the same trainer on the same plans twice is an error,
    and so is a ``--preset`` that no entry would use."""
    specs = [parse_trainer_spec(e) for e in entries]
    seen = {}
    for spec in specs:
        row = (spec.trainer, spec.plans_id(run_plans))
        if row in seen:
            raise UserError(f"--trainers entries {seen[row]!r} and {spec.given!r} both train {row[0]} on plans "
                            f"{row[1]}: list it once")
        seen[row] = spec.given
    if preset is not None and all(s.plans is not None for s in specs):
        raise UserError(f"--preset {preset} changes only the plans of entries without their own plans "
                        f"(--plans {run_plans}), and every --trainers entry names its plans: drop --preset")
    return specs
