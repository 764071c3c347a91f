#!/usr/bin/env bash
# Make a virtual environment (.venv-test), install nnunet-mamba with its test extras under
# the pinned torch, and run the test suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"      # skip the end-to-end nnU-Net runs
# Test files run in parallel, one file per worker (pytest-xdist, --dist loadfile: a file's
# fixtures, e.g. a planned nnU-Net dataset, are built once); NNMAMBA_TEST_WORKERS=0 runs
# everything in one process (default 2 workers: most of an end-to-end test is spent
# importing nnU-Net in its subprocesses, one core each).
set -euo pipefail
VENV=${NNMAMBA_TEST_VENV:-.venv-test} EXTRAS="[test]"
source "$(dirname "$0")/_venv.sh"
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2} nnUNet_def_n_proc=${nnUNet_def_n_proc:-2}
exec "$VENV/bin/python" -m pytest -q -n "${NNMAMBA_TEST_WORKERS:-2}" --dist loadfile "$@"
