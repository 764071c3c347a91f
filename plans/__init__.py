"""Plans presets of nnunet-mamba (installed as ``nnunet_mamba_plans``); see ``nnmamba plans``."""
