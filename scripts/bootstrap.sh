#!/usr/bin/env bash
# Creates .venv with pinned dependencies (idempotent; re-installs only when the pins change).
# torch==2.13.0 goes in first: on our machines it resolves to a local CPU wheel, while an
# unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.xrdmatch-stamp
want=$(cat pyproject.toml requirements.lock | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v -E '^WARNING: Location|BuildBackendWarning' || true
  .venv/bin/python -c "import xrdmatch, torch, ray, mlflow, pymatgen.core, ase, chgnet" 
  echo "$want" > "$stamp"
fi
