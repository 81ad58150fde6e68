#!/usr/bin/env bash
# The install step: creates .venv with the pinned dependencies (idempotent: re-installs only when
# pyproject.toml or requirements.lock change). torch==2.13.0 goes in first: on our machines it
# resolves to a local CPU wheel, while an unpinned torch would pull several GB of CUDA packages.
# TORCH_INDEX_URL (optional) points pip at another torch index (the Docker image uses the CPU one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
ok_py='import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))'  # pyproject's requires-python
"$PY" -c "$ok_py" || {
  echo "bootstrap: needs Python 3.11 or 3.12 (set PYTHON=/path/to/python3.11); $PY is $("$PY" -V 2>&1)" >&2; exit 1; }
# A venv whose creation failed half-way (e.g. no python3.11-venv: bin/python but no pip) or that
# an unsupported Python made is rebuilt, not reused forever.
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import pip; $ok_py" 2>/dev/null; then
  echo "bootstrap: .venv is broken or made by an unsupported Python: recreating it" >&2
  rm -rf .venv
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv || {
  echo "bootstrap: '$PY -m venv' failed; on Debian/Ubuntu: apt-get install python3.11-venv" >&2; rm -rf .venv; exit 1; }

pipq() {  # pip, quiet, without the noise of unreachable local indexes; keeps pip's exit status
  local log; log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}

stamp=.venv/.xrdmatch-stamp
want=$( (cat pyproject.toml requirements.lock; echo "torch index: ${TORCH_INDEX_URL:-}") | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing pinned dependencies into .venv (first run takes a few minutes)"
  pipq --upgrade pip
  pipq torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  pipq -r requirements.lock
  pipq --no-deps -e .
  .venv/bin/python -c "import xrdmatch, torch, ray, mlflow, pymatgen.core, ase, chgnet, pymatgen.analysis.diffusion"
  echo "$want" > "$stamp"
fi
