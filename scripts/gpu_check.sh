#!/usr/bin/env bash
# The checks a session with a lent GPU should run (README "Training throughput" and "GPUs"), as
# one prepared command: device time is short (minutes) and the device machine has torch and CUDA
# but neither the platform's dependencies nor a network.
#
#   here:       bash scripts/gpu_check.sh prepare    # -> .dev/ (wheels for the device's Python,
#                                                    #    the benchmark's database patterns, the
#                                                    #    member trainings to run there)
#   device:     bash scripts/gpu_check.sh run        # device tool: carry [".dev"], timeout_s ~450
#
# `run` (1) checks the trainer's CUDA-graph augmentation step (the CUDA tests of
# tests/test_augment_step.py, which skip on a CPU), (2) regenerates the README block
# `train-throughput-gpu` through scripts/update_readme.py, (3) trains the vgg16_paper members of
# benchmarks/network_accuracy.py's grouped CV (supervised and FlexMatch, $ITERATIONS steps),
# which no CPU session can afford. $OUT gets README.md, the outputs, and network-accuracy/: copy
# it into runs/bench/network-accuracy/ here and run the command that `prepare` prints last; it
# trains the `fast` members here and compares the two networks fold by fold.
# Settings (environment): DEVICE_PYTHON (3.12, the device image's), ITERATIONS (1000),
# METHODS (supervised,flexmatch), GPU_NETWORK (vgg16_paper), WORKERS (4 training processes on
# the GPU), DEV (.dev); to try `run` on a CPU: DEVICE=cpu PYTHON=.venv/bin/python, TT_ARGS, and
# a `prepare` with DEVICE_PYTHON=3.11 ITERATIONS=2 GPU_NETWORK=fast into another DEV.
# A run cut off by its time limit keeps the members it finished under $OUT/network-accuracy:
# copy that folder's contents to $DEV/done/ and `run` again; it trains only the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=${DEV:-.dev}
mode=${1:-}
ITERATIONS=${ITERATIONS:-1000}
ACC="benchmarks/network_accuracy.py --methods ${METHODS:-supervised,flexmatch} --iterations $ITERATIONS"
TT_ARGS=${TT_ARGS:---iterations 20}  # train_throughput.py's arguments (fewer to try `run` on a CPU)

case "$mode" in
prepare)
  bash scripts/bootstrap.sh  # the venv: pip (for the wheels), pymatgen (for the patterns)
  pyv=${DEVICE_PYTHON:-3.12}
  mkdir -p "$DEV/whl"
  # versions from requirements.lock, so the device runs what CI runs; binary wheels only (the
  # device cannot build), for the device's Python and platform
  pins=$(grep -iE '^(pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions|PyYAML|numpy|pytest|pytest-timeout|pluggy|iniconfig|packaging)==' requirements.lock)
  # shellcheck disable=SC2086
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$pyv" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEV/whl" $pins 2>"$DEV/pip.log" \
    || { grep -v '^WARNING: Location' "$DEV/pip.log" >&2; exit 1; }
  .venv/bin/python - "$DEV/db_patterns.npy" <<'EOF'
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("tt", "benchmarks/train_throughput.py")
tt = importlib.util.module_from_spec(spec); spec.loader.exec_module(tt)
x = tt.database_patterns(8 * 96)  # the benchmark's unlabelled pool, computed with pymatgen here
np.save(sys.argv[1], x)
print(f"{sys.argv[1]}: {x.shape[0]} database patterns")
EOF
  # the vgg16_paper members of the network comparison, with their data (no Ray or pymatgen there)
  rm -rf "$DEV/jobs"
  .venv/bin/python $ACC --networks "${GPU_NETWORK:-vgg16_paper}" --export-jobs "$DEV/jobs"
  ls "$DEV/whl"
  echo "prepared $DEV ($(du -sh "$DEV" | cut -f1)); on the device: bash scripts/gpu_check.sh run (carry [\"$DEV\"])"
  echo "then here: cp -r <files_at>/network-accuracy/. runs/bench/network-accuracy/ &&"
  echo "  python scripts/update_readme.py network-accuracy-flexmatch -- .venv/bin/python $ACC"
  ;;
run)
  PY=${PYTHON:-python3}
  site=${TMPDIR:-/tmp}/xrdmatch-site
  out=${OUT:-$DEV/out}
  mkdir -p "$site" "$out"
  # a wheel is a zip laid out as site-packages: unpacking needs no pip
  "$PY" - "$site" "$DEV"/whl/*.whl <<'EOF'
import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])
EOF
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  # --noconftest: conftest.py wants the whole platform (Ray, MLflow); this file loads its own data
  rc=0
  "$PY" -m pytest -q -rs --noconftest -p no:cacheprovider tests/test_augment_step.py \
    2>&1 | tee "$out/test_augment_step.txt" || rc=$?
  # shellcheck disable=SC2086
  "$PY" scripts/update_readme.py train-throughput-gpu -- "$PY" benchmarks/train_throughput.py $TT_ARGS \
    --device "${DEVICE:-cuda}" --patterns "$DEV/db_patterns.npy" || rc=$?
  mkdir -p "$out/network-accuracy"
  [ -d "$DEV/done" ] && cp -r "$DEV/done/." "$out/network-accuracy/"  # an earlier, cut-off run's members
  "$PY" scripts/train_member_jobs.py "$DEV/jobs" --out "$out/network-accuracy" --device "${DEVICE:-cuda}" \
    --workers "${WORKERS:-4}" 2>&1 | tee "$out/train_member_jobs.txt" || rc=$?
  cp README.md "$out/README.md"
  exit "$rc"
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare|run" >&2
  exit 2
  ;;
esac
