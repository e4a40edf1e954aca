#!/usr/bin/env bash
# Creates .venv (once) and installs megallama with its test extra into it.
# torch 2.13.0 is installed first where no torch is present: an unpinned torch would
# pull a multi-GB CUDA build; GPU users bring their own torch and pyproject keeps a range.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEGALLAMA_VENV:-$root/.venv}"
stamp="$venv/.megallama-installed"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$py" -m pip install -q --upgrade pip
  if ! "$py" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch 2.13.0 (CPU build)"
    "$py" -m pip install -q "torch==2.13.0"
  fi
  echo "[setup] installing megallama[test]"
  "$py" -m pip install -q -e "$root[test]"
  touch "$stamp"
fi
