#!/usr/bin/env bash
# Make a virtual environment (.venv-demo), install nnunet-mamba under the pinned torch and
# run the demo: synthetic dataset -> nnU-Net plan/preprocess -> nnMambaTrainer (CPU, a few
# minutes) -> nnUNetv2_predict on held-out cases -> Dice. Arguments go to `nnmamba demo`.
set -euo pipefail
VENV=${NNMAMBA_DEMO_VENV:-.venv-demo} EXTRAS=""
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/nnmamba" demo "$@"
