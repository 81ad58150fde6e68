#!/usr/bin/env bash
# The test command: installs what it needs, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/system_deps.sh
# GPAW, the optional ab initio MD tier (pyproject extra `gpaw`), so that its test runs for real
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gpaw') is None)" 2>/dev/null \
  || .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[gpaw]' >/dev/null 2>&1 \
  || echo "warning: GPAW did not install (needs libxc-dev, libopenblas-dev); its test is skipped" >&2
eval "$(bash scripts/postgres.sh)"   # PostgreSQL on 127.0.0.1 for the cluster-mode store tests
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -rs --durations=25 "$@"
