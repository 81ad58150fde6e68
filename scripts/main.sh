#!/usr/bin/env bash
# The main job on embedded defaults (local Ray, SQLite, file MLflow store under runs/default):
# installs what it needs, then runs the campaign of configs/default.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/xrdmatch xrd --db data/mp_li_structures.jsonl.xz --out runs/default/patterns "$@"
