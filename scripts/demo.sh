#!/usr/bin/env bash
# Make a virtual environment (.venv-demo), install nnunet-mamba under the pinned torch and
# run the demo: synthetic dataset -> nnU-Net plan/preprocess -> nnMambaTrainer_demo (8 short
# epochs, one line per epoch) -> nnUNetv2_predict on held-out cases -> Dice table, a PNG of a
# held-out case and nnU-Net's progress.png. Arguments go to `nnmamba demo`, e.g.
#   bash scripts/demo.sh --device cuda      # train and predict on the GPU
#   bash scripts/demo.sh --workdir /tmp/d   # where data and results go (default nnmamba_demo)
set -euo pipefail
VENV=${NNMAMBA_DEMO_VENV:-.venv-demo} EXTRAS=""
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/nnmamba" demo "$@"
