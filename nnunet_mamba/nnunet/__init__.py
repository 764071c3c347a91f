"""Our one interface to stock nnU-Net v2 (``nnunetv2``): folders, commands, trainers, plans.

- :mod:`.folders`: the ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` folders
  (from the environment or a work folder), dataset folder names ``Dataset<ID>_<NAME>``,
  lookup by ID and the check that an ID is free.
- :mod:`.commands`: the environment of the ``nnUNetv2_*`` commands and running them.
- :mod:`.trainers`: finding trainer classes (ours and nnU-Net's) and building their networks.
- :mod:`.plans_presets`: the ``nnmamba plans`` command (plans presets such as the paper's).

Nothing heavy is imported here; ``nnunetv2`` is imported inside the functions that need it.
"""
