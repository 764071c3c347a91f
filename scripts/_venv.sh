# Sourced by test.sh and demo.sh: make (or reuse) the virtual environment $VENV and install
# nnunet-mamba into it, editable, with the extras in $EXTRAS, under constraints.txt's torch.
# Quiet: one line of its own, no pip notices or progress bars, build output only on failure.
# The install is skipped when the packaging files and extras are those of the last install.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
_stamp_file="$VENV/.nnmamba-install"
_stamp="$(cat setup.cfg setup.py pyproject.toml constraints.txt 2>/dev/null | cksum) extras=${EXTRAS:-}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$_stamp_file" 2>/dev/null)" != "$_stamp" ]; then
    echo "installing nnunet-mamba${EXTRAS:-} into $VENV (the first time takes a few minutes) ..."
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    _pip=(env PYTHONWARNINGS=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
          "$VENV/bin/python" -m pip install -q --progress-bar off)
    "${_pip[@]}" --upgrade pip setuptools wheel
    "${_pip[@]}" -c constraints.txt -e ".${EXTRAS:-}"
    echo "$_stamp" > "$_stamp_file"
fi
