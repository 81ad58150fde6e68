#!/usr/bin/env bash
# The main job on embedded defaults (local Ray, SQLite campaign store and MLflow store under runs/default):
# installs what it needs, runs (or resumes) the active-learning campaign of configs/default.yaml,
# then writes its HTML report. Extra arguments go to `xrdmatch campaign run` (e.g. --dir DIR).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0

# --config and --dir name paths from where the command was typed, though it runs from the
# repository: a relative --dir is made absolute against the caller's directory, and so is a
# relative --config that exists there (else xrdmatch looks it up in the repository, e.g.
# configs/cluster.yaml). The report reads the same run directory and config as the campaign
# (the last one given wins, as in typer).
from_caller() {  # $1: path, $2: "must exist" to keep a path that is not there as it is
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) if [[ ${2:-} != "must exist" || -e "$caller/$1" ]]; then printf '%s' "$caller/$1"; else printf '%s' "$1"; fi ;;
  esac
}
dir="" config=configs/default.yaml help=""
args=()
while (($#)); do
  a=$1
  shift
  case "$a" in
    --dir | -d) dir=$(from_caller "${1:-}"); args+=(--dir "$dir"); shift || true ;;
    --dir=*) dir=$(from_caller "${a#--dir=}"); args+=(--dir "$dir") ;;
    -d?*) dir=$(from_caller "${a#-d}"); args+=(--dir "$dir") ;;
    --config | -c) config=$(from_caller "${1:-}" "must exist"); args+=(--config "$config"); shift || true ;;
    --config=*) config=$(from_caller "${a#--config=}" "must exist"); args+=(--config "$config") ;;
    -c?*) config=$(from_caller "${a#-c}" "must exist"); args+=(--config "$config") ;;
    --help | -h) help=1; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
.venv/bin/xrdmatch campaign run --config "$config" ${args[@]+"${args[@]}"}
[[ -n $help ]] && exit 0  # --help printed the campaign's options; there is no run to report on
.venv/bin/xrdmatch campaign report --config "$config" ${dir:+--dir "$dir"}
