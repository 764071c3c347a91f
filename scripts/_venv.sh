# Sourced by test.sh and demo.sh: make (or reuse) the virtual environment $VENV and install
# nnunet-mamba into it, editable, with the extras in $EXTRAS, under constraints.txt's torch.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".${EXTRAS:-}"
