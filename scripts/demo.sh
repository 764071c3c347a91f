#!/usr/bin/env bash
# Make a virtual environment (.venv-demo), install nnunet-mamba under the pinned torch and
# run the demo: synthetic dataset -> nnU-Net plan/preprocess -> nnMambaTrainer (CPU, a few
# minutes) -> nnUNetv2_predict on held-out cases -> Dice. Arguments go to `nnmamba demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NNMAMBA_DEMO_VENV:-.venv-demo}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q -c constraints.txt -e .
exec "$VENV/bin/nnmamba" demo "$@"
