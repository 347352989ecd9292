# Sourced by test.sh and quickstart.sh: use the active virtualenv, else create/activate ./.venv, then install
# torch 2.13.0 (CPU) first -- a plain `torch` requirement would pull a multi-GB CUDA build -- and the package.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
