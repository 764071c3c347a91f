#!/usr/bin/env bash
# Make a virtual environment (.venv-test), install nnunet-mamba with its test extras under
# the pinned torch, and run the test suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"      # skip the end-to-end nnU-Net runs
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NNMAMBA_TEST_VENV:-.venv-test}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2} nnUNet_def_n_proc=${nnUNet_def_n_proc:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$VENV/bin/python" -m pytest -q "$@"
