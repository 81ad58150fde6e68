#!/usr/bin/env bash
# The main job on embedded defaults (local Ray, SQLite campaign store and MLflow store under runs/default):
# installs what it needs, runs (or resumes) the active-learning campaign of configs/default.yaml,
# then writes its HTML report. Extra arguments go to `xrdmatch campaign run` (e.g. --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0
.venv/bin/xrdmatch campaign run --config configs/default.yaml "$@"
dir=runs/default
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--dir" || "${!i}" == "-d" ]]; then j=$((i + 1)); dir=${!j}; fi
done
.venv/bin/xrdmatch campaign report --config configs/default.yaml --dir "$dir"
