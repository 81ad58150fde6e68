#!/usr/bin/env bash
# The main job on embedded defaults (local Ray, SQLite campaign store and MLflow store under runs/default):
# installs what it needs, runs (or resumes) the active-learning campaign of configs/default.yaml,
# then writes its HTML report. Extra arguments go to `xrdmatch campaign run` (e.g. --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0
# the report reads the same run directory and config as the campaign (last one given wins, as in typer)
dir="" config=configs/default.yaml
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a=${args[i]} next=${args[i + 1]:-}
  case "$a" in
    --dir | -d) dir=$next ;;
    --dir=*) dir=${a#--dir=} ;;
    -d?*) dir=${a#-d} ;;
    --config | -c) config=$next ;;
    --config=*) config=${a#--config=} ;;
    -c?*) config=${a#-c} ;;
  esac
done
.venv/bin/xrdmatch campaign run --config "$config" "$@"
.venv/bin/xrdmatch campaign report --config "$config" ${dir:+--dir "$dir"}
