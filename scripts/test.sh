#!/usr/bin/env bash
# Make a virtual environment (.venv-test), install nnunet-mamba with its test extras under
# the pinned torch, and run the test suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"      # skip the end-to-end nnU-Net runs
set -euo pipefail
VENV=${NNMAMBA_TEST_VENV:-.venv-test} EXTRAS="[test]"
source "$(dirname "$0")/_venv.sh"
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2} nnUNet_def_n_proc=${nnUNet_def_n_proc:-2}
exec "$VENV/bin/python" -m pytest -q "$@"
