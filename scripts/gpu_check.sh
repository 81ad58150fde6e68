#!/usr/bin/env bash
# The checks a session with a lent GPU should run (README "Training throughput" and "GPUs"), as
# one prepared command: device time is short (minutes) and the device machine has torch and CUDA
# but neither the platform's dependencies nor a network.
#
#   here:       bash scripts/gpu_check.sh prepare    # -> .dev/ (wheels for the device's Python,
#                                                    #    the benchmark's database patterns, the
#                                                    #    member trainings to run there)
#   device:     bash scripts/gpu_check.sh run        # device tool: carry [".dev"], timeout_s 480
#
# `run` (1) checks the trainer's CUDA-graph augmentation step (the CUDA tests of
# tests/test_augment_step.py, which skip on a CPU), (2) regenerates the README block
# `train-throughput-gpu` through scripts/update_readme.py, (3) trains the vgg16_paper members of
# benchmarks/network_accuracy.py's grouped CV (supervised and FlexMatch, $ITERATIONS steps),
# which no CPU session can afford, (4) watches one vgg16_paper FlexMatch member along the paper's
# 1000 steps (benchmarks/flexmatch_lean.py: does it come back from the superionic flood?). $OUT
# gets README.md, the logs, network-accuracy.tgz and flexmatch-lean.tgz: unpack them into
# runs/bench/network-accuracy/ and runs/bench/flexmatch-lean/ here and run the two commands that
# `prepare` prints last; the first trains the `fast` members here and compares the two networks
# fold by fold.
# Settings (environment): DEVICE_PYTHON (3.12, the device image's), ITERATIONS (1000),
# METHODS (supervised,flexmatch), GPU_NETWORK (vgg16_paper), WORKERS (4 training processes on
# the GPU), MEMBERS_S (240), LEAN_S (120), DEV (.dev). To try `run` on a CPU: a `prepare` with DEVICE_PYTHON=3.11
# ITERATIONS=2 GPU_NETWORK=fast into another DEV, then DEVICE=cpu, TT_ARGS="--iterations 1
# --networks fast" and PYTHON= a venv holding what the device image holds (torch, numpy, pandas,
# pyyaml, pytest, pytest-timeout), not the platform.
# Members not finished within MEMBERS_S (240) seconds are left for another call: unpack the
# returned network-accuracy.tgz into $DEV/done/ and `run` again; it trains only the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=${DEV:-.dev}
mode=${1:-}
ITERATIONS=${ITERATIONS:-1000}
ACC="benchmarks/network_accuracy.py --methods ${METHODS:-supervised,flexmatch} --iterations $ITERATIONS --calls"
LEAN="benchmarks/flexmatch_lean.py --methods flexmatch --iterations $ITERATIONS --every $(( ITERATIONS >= 20 ? ITERATIONS / 20 : 1 ))"
TT_ARGS=${TT_ARGS:---iterations 20}  # train_throughput.py's arguments (fewer to try `run` on a CPU)

case "$mode" in
prepare)
  bash scripts/bootstrap.sh  # the venv: pip (for the wheels), pymatgen (for the patterns)
  pyv=${DEVICE_PYTHON:-3.12}
  mkdir -p "$DEV" && find "$DEV" -mindepth 1 -maxdepth 1 ! -name done -exec rm -rf {} +  # keep done/
  mkdir -p "$DEV/whl"
  # wheels at requirements.lock's versions, so the device runs what CI runs; binary only (the
  # device cannot build), for the device's Python and platform
  wheels() {
    .venv/bin/python -m pip download -q --disable-pip-version-check --only-binary=:all: -c requirements.lock \
      --python-version "$pyv" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$DEV/whl" "$@" \
      2>"$DEV/pip.log" || { grep -v '^WARNING: Location' "$DEV/pip.log" >&2; exit 1; }
  }
  # the device image has numpy, pandas, pyyaml, pytest(-timeout), tabulate, scipy
  # (/work/.library/device/KINDS.md); not pydantic, nor pymatgen, of which the labelled loader
  # needs Composition alone (reduced formulas): pymatgen-core and what importing it needs;
  # typing-extensions at the version pydantic was locked with
  wheels --no-deps pydantic pydantic-core annotated-types typing-inspection typing-extensions \
    pymatgen-core monty ruamel.yaml orjson
  .venv/bin/python - "$DEV/db_patterns.npz" <<'EOF'
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("tt", "benchmarks/train_throughput.py")
tt = importlib.util.module_from_spec(spec); spec.loader.exec_module(tt)
x = tt.database_patterns(8 * 96)  # the benchmark's unlabelled pool, computed with pymatgen here
np.savez_compressed(sys.argv[1], X=x)
print(f"{sys.argv[1]}: {x.shape[0]} database patterns")
EOF
  # the vgg16_paper members of the network comparison, with their data (no Ray or pymatgen there)
  .venv/bin/python $ACC --networks "${GPU_NETWORK:-vgg16_paper}" --export-jobs "$DEV/jobs"
  .venv/bin/python $LEAN --networks "${GPU_NETWORK:-vgg16_paper}" --export-data "$DEV/lean_data.npz"
  ls "$DEV/whl"
  mb=$(du -sm "$DEV" | cut -f1)
  [ "$mb" -le 50 ] || echo "warning: $DEV is $mb MB; the device tool carries 64 MiB with the working tree" >&2
  echo "prepared $DEV ($(du -sh "$DEV" | cut -f1)); on the device: bash scripts/gpu_check.sh run (carry [\"$DEV\"], timeout_s 480)"
  echo "then here: mkdir -p runs/bench/network-accuracy && tar -xzf <files_at>/network-accuracy.tgz -C runs/bench/network-accuracy &&"
  echo "  python scripts/update_readme.py network-accuracy-flexmatch -- .venv/bin/python $ACC"
  echo "and: mkdir -p runs/bench/flexmatch-lean && tar -xzf <files_at>/flexmatch-lean.tgz -C runs/bench/flexmatch-lean &&"
  echo "  python scripts/update_readme.py flexmatch-lean-1000 -- .venv/bin/python $LEAN --networks fast,${GPU_NETWORK:-vgg16_paper}"
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
    --device "${DEVICE:-cuda}" --patterns "$DEV/db_patterns.npz" || rc=$?
  # members: trained into a local folder and packed as one file ($OUT returns at most 8 files, two
  # folders deep); stopped after MEMBERS_S seconds so that what is done is always packed
  members=${TMPDIR:-/tmp}/xrdmatch-members
  mkdir -p "$members"
  [ -d "$DEV/done" ] && cp -r "$DEV/done/." "$members/"  # an earlier, cut-off run's members
  timeout "${MEMBERS_S:-240}" "$PY" scripts/train_member_jobs.py "$DEV/jobs" --out "$members" \
    --device "${DEVICE:-cuda}" --workers "${WORKERS:-4}" 2>&1 | tee "$out/train_member_jobs.txt" || rc=$?
  tar -czf "$out/network-accuracy.tgz" --exclude='*.tmp.npz' -C "$members" .
  echo "$(find "$members" -name '*.npz' ! -name '*.tmp.npz' | wc -l) members in $out/network-accuracy.tgz"
  # one member watched along the run (a few hundred GPU-seconds at most; its JSON is the cache entry)
  lean=${TMPDIR:-/tmp}/xrdmatch-lean
  mkdir -p "$lean"
  # shellcheck disable=SC2086
  timeout "${LEAN_S:-120}" "$PY" $LEAN --networks "${GPU_NETWORK:-vgg16_paper}" --data "$DEV/lean_data.npz" \
    --device "${DEVICE:-cuda}" --dir "$lean" 2>&1 | tee "$out/flexmatch_lean.txt" || rc=$?
  tar -czf "$out/flexmatch-lean.tgz" --exclude='*.tmp' -C "$lean" .
  cp README.md "$out/README.md"
  exit "$rc"
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare|run" >&2
  exit 2
  ;;
esac
