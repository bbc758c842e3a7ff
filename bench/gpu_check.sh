#!/usr/bin/env bash
# One-shot check on a machine with one NVIDIA GPU, Python 3.12, torch preinstalled and no package registry.
#
#   bench/gpu_check.sh                    # every stage, in priority order, within one time budget (one device call)
#   bench/gpu_check.sh strong seed        # only these stages, in this order
#
# Expects (carried beside the checkout, git-ignored): .whl/ from `make wheelhouse` (the wheels the study needs that
# the machine's image lacks) and .mnist/ with the four MNIST files xz-compressed (`make wheelhouse` writes both).
# Stages, in the default order (what issue #5 checks first):
#   strong        the strong preset (configs/strong.yaml) through the flow, fresh
#   seed          the seed study through the flow, fresh
#   folds         the seed model's 3 folds stacked vs one after another, 5 epochs as the seed study's CV trains them
#                 (captured steps only; also with every LayerNorm through F.layer_norm, the kernel before 2026-12-05)
#   strong-tuned  only when strong finished but missed 99.70% or 5 minutes: the strong preset again with as many
#                 epochs as its measured seconds per epoch fit into 5 minutes (and into the time left); before
#                 throughput, whose fit-vs-bare ratios were met on an H100 already. The strong preset already fits
#                 its epochs to the 5 minutes itself (time_budget), so this is the fallback for a run that overran
#   throughput    fit vs a bare loop and batched folds over 1 epoch, seed model (bench/train_throughput.py)
#   profile-strong  the strong preset's training step: ms per step and its top kernels (bench/profile_step.py)
#   resumed       the seed study again: every fold from the result store
#   bigger        fit vs bare loop and batched folds for the dim-64 model
#   profile       torch.profiler tables of one stacked run of 1 and of 3 folds: which kernels grow with k
# All of it runs against one budget, GPU_CHECK_BUDGET seconds from the script's start (default 570, for a device
# call of 600 s): each stage's timeout is its own cap or what is left, and a stage that no longer fits is skipped
# with a row saying so. The wheels go to /tmp/site once per machine (only pydantic's when no study stage is asked
# for: `bench/gpu_check.sh folds throughput` in a second call sets up in ~14 s instead of ~55). $OUT gets at most
# 8 files (what a device call returns): machine.txt, table.txt (a row per stage, then a verdict on the GPU checks
# from bench/gpu_verdict.py), the four study logs, throughput.md (the bench tables) and throughput.log; the table
# and the bench tables are printed last.
#
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU at toy sizes (smoke preset for the seed study, a 1-epoch strong
# preset on a subset, a 100 s target for strong-tuned): a rehearsal of the script itself, e.g. in a Python 3.12
# environment that mirrors the GPU machine's image, so that the device time goes to the measurements. PYTHON picks
# the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT="${OUT:-/tmp/gpu-check}"; mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
ALL=(strong seed folds strong-tuned throughput profile-strong resumed bigger profile)
STAGES=("$@"); [ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL[@]}")
for stage in "${STAGES[@]}"; do
  [[ " ${ALL[*]} " == *" $stage "* ]] || { echo "unknown stage '$stage': use ${ALL[*]}" >&2; exit 2; }
done
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

# Only the wheels whose distribution the machine lacks: its own numpy, scipy, onnx, pytest... stay as they are.
# Byte-compiled at install, so that the first study does not pay for it.
# A warm machine that ran this before keeps /tmp/site; the marker names the wheel set that was installed.
# Benches alone (no study among the stages: a second call for what the first had no time for) need only pydantic
# beside the image's packages: those four wheels, no Prefect database, 14 s of set-up on the H200 instead of 55.
STUDY=0
for stage in "${STAGES[@]}"; do case "$stage" in strong|seed|resumed|strong-tuned) STUDY=1 ;; esac; done
SITE=/tmp/site
SETUP=/tmp/gpu-check-setup; mkdir -p "$SETUP"  # install logs stay off $OUT (a device call returns 8 files at most)
installed() {  # the whole set serves any stage; the benches' part serves benches only
  cmp -s <(ls .whl) "$SITE/.vitflow-wheels" \
    || { [ "$STUDY" = 0 ] && cmp -s <(ls .whl; echo "benches only") "$SITE/.vitflow-wheels"; }
}
if ! installed 2>/dev/null; then
  BENCH_ONLY=$(( 1 - STUDY )) "$PYTHON" - > "$SETUP/wheels.txt" <<'EOF'
import importlib.metadata as metadata
import os
from pathlib import Path

from packaging.utils import parse_wheel_filename

BENCH = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection"}  # what bench/ imports beyond the image
for wheel in sorted(Path(".whl").glob("*.whl")):
    name = parse_wheel_filename(wheel.name)[0]
    if os.environ["BENCH_ONLY"] == "1" and name not in BENCH:
        continue
    try:
        print(f"# {name} {metadata.version(name)} is installed: {wheel.name} skipped")
    except metadata.PackageNotFoundError:
        print(wheel)
EOF
  { grep -v '^#' "$SETUP/wheels.txt" || true; } | xargs -r "$PYTHON" -m pip install -q --no-index --no-deps \
    --no-cache-dir --upgrade --target "$SITE" > "$SETUP/pip.log" 2>&1 || { tail -20 "$SETUP/pip.log"; exit 1; }
  { ls .whl; [ "$STUDY" = 1 ] || echo "benches only"; } > "$SITE/.vitflow-wheels"
fi
export PYTHONPATH="$SITE:$PWD"
DATA=/tmp/vitflow-data
if [ ! -s "$DATA/MNIST/raw/t10k-labels-idx1-ubyte" ]; then
  mkdir -p "$DATA/MNIST/raw"
  for f in .mnist/*.xz; do xz -dc "$f" > "$DATA/MNIST/raw/$(basename "$f" .xz)"; done
fi
export VITFLOW_DATA_DIR="$DATA" PREFECT_HOME=/tmp/prefect-home VITFLOW_RESULTS_DIR=/tmp/vitflow-results
# Prefect's database, as `make install` and the Docker image create it: not part of any study's time.
[ "$STUDY" = 0 ] || [ -s "$PREFECT_HOME/prefect.db" ] \
  || "$PYTHON" -m prefect server database upgrade -y > "$SETUP/prefect-db.log" 2>&1 \
  || { tail -20 "$SETUP/prefect-db.log"; exit 1; }

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; SEED_CONFIG=smoke; BUDGET="${GPU_CHECK_BUDGET:-1500}"; STRONG_TARGET=100; SCALE=3
  FIT_ARGS=(--images 2000 --repeats 1); FOLD_EPOCHS=2; FOLD_ARGS=(--images 1000 --repeats 1)
  PROFILE_STRONG_ARGS=(--images 512 --set train.batch_size=128)
  STRONG_SET=(--set train.epochs=1 --set cv.epochs=1 --set data.train_subset=3000 --set data.test_subset=1000
              --set train.batch_size=128)
  echo "dry run on the CPU ($(nproc) cores)" > "$OUT/machine.txt"
else
  DEVICE=cuda; SEED_CONFIG=seed; BUDGET="${GPU_CHECK_BUDGET:-570}"; STRONG_TARGET=300; SCALE=1
  FIT_ARGS=(--images 20000 --repeats 3); FOLD_EPOCHS=5; FOLD_ARGS=(--images 20000 --repeats 3); STRONG_SET=()
  PROFILE_STRONG_ARGS=(--images 30720)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/machine.txt"
fi
"$PYTHON" -c "import sys, torch, prefect, mlflow, onnx, onnxruntime as o; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'prefect', prefect.__version__, 'mlflow', mlflow.__version__, 'onnx', onnx.__version__, 'ort', o.__version__, o.get_available_providers())" | tee -a "$OUT/machine.txt"
[ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" && {
  echo "torch sees no CUDA device: not a GPU check (GPU_CHECK_DRY_RUN=1 rehearses on the CPU)"; exit 1; }
SET_UP="wheels, MNIST, Prefect database"; [ "$STUDY" = 1 ] || SET_UP="the benches' wheels, MNIST"
echo "set-up | $(( $(date +%s) - T0 ))s ($SET_UP)" > "$OUT/table.txt"
: > "$OUT/throughput.md"; : > "$OUT/throughput.log"

# Seconds left for stages: 25 s are kept for the report and for a stage that ignores its SIGTERM (killed 20 s later).
left() { echo $(( BUDGET - ($(date +%s) - T0) - 25 )); }
fits() {  # label, cap, minimum (GPU seconds; x SCALE in a dry run): prints the stage's timeout, or skips it
  local cap=$(( $2 * SCALE )) need=$(( $3 * SCALE )) rest
  rest=$(left)
  if [ "$rest" -lt "$need" ]; then
    echo "$1 | skipped: ${rest}s of the budget left, needs ${need}s" >> "$OUT/table.txt"; return 1
  fi
  echo $(( rest < cap ? rest : cap ))
}
seconds_since() { "$PYTHON" -c "import time; print(f'{time.time() - $1:.1f}')"; }
phases() {  # start (epoch s), log: seconds before the flow's first log line and after Prefect's server stopped
  "$PYTHON" - "$1" "$2" <<'EOF'
import datetime, re, sys, time
start, end, log = float(sys.argv[1]), time.time(), open(sys.argv[2], errors="replace").read()
day = datetime.datetime.fromtimestamp(start).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
def at(pattern, last=False):
    hits = re.findall(r"^(\d\d):(\d\d):(\d\d\.\d+) \| .*" + pattern, log, re.M)
    if not hits:
        return None
    h, m, s = hits[-1 if last else 0]
    return day + int(h) * 3600 + int(m) * 60 + float(s)
begin, stop = at("Beginning flow run"), at("Stopping temporary server", last=True)
print("before flow " + (f"{begin - start:.1f}s" if begin else "?") + ", after it " + (f"{end - stop:.1f}s" if stop else "?"))
EOF
}
progress() {  # MLflow DB, start (epoch s): the runs of a study started then (epochs, errors), from its SQLite file
  "$PYTHON" - "$1" "$2" <<'EOF'
import sqlite3, sys
since = int(float(sys.argv[2]) * 1000)
try:
    db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
    runs = db.execute("select run_uuid, name, status, start_time, end_time from runs where start_time >= ? "
                      "order by start_time", (since,)).fetchall()
except sqlite3.Error as exc:
    print(f"  progress: no MLflow store to read ({exc})"); sys.exit()
def series(run, key):
    return [v for _, v in db.execute("select step, value from metrics where run_uuid = ? and key = ? order by step",
                                     (run, key)).fetchall()]
t0 = since
for run, name, status, start, end in runs:
    errors = series(run, "test_error") or series(run, "val_error")
    seconds = series(run, "epoch_seconds")
    if not errors:
        continue
    train = series(run, "train_error")  # on the augmented images: is a levelled-off test error fit-limited?
    every = max(1, len(errors) // 10)  # the curve at about 10 points, the last epoch included
    points = sorted({*range(every - 1, len(errors), every), len(errors) - 1})
    curve = " ".join(f"{i + 1}:{errors[i]:.4f}" + (f"/{train[i]:.4f}" if i < len(train) else "") for i in points)
    print(f"  progress: {name} {status} at {(start - t0) / 1000:.0f} s: {len(errors)} epoch(s), best "
          f"{min(errors):.4f}, {sum(seconds) / max(len(seconds), 1):.2f} s/epoch; error by epoch "
          f"(evaluated/augmented training) {curve}")
EOF
}
STUDY_RC=""; STUDY_WALL=""; STUDY_LOG=""
run_study() {  # label, timeout, extra args...
  local label=$1 limit=$2; shift 2
  local start
  start=$(date +%s.%N)
  MLFLOW_TRACKING_URI="sqlite:////tmp/mlflow-${label%%-*}.db" timeout -k 20 "$limit" "$PYTHON" -m flows.cli run "$@" \
    > "$OUT/$label.log" 2>&1
  STUDY_RC=$?; STUDY_WALL=$(seconds_since "$start"); STUDY_LOG="$OUT/$label.log"
  local acc timing
  acc=$(grep -o 'Test accuracy (ONNX Runtime, [A-Za-z]*): [0-9.]*%' "$STUDY_LOG" | tail -1)
  timing=$(grep -o 'Wall time: .*' "$STUDY_LOG" | tail -1)
  echo "$label | rc=$STUDY_RC | process wall ${STUDY_WALL}s (limit ${limit}s) | $(phases "$start" "$STUDY_LOG") | $acc | $timing" \
    >> "$OUT/table.txt"
  grep -m3 -o -E 'CUDA graph capture failed.*|augmentation generators did not advance.*|fused attention kernel failed.*' "$STUDY_LOG" | cut -c1-300 >> "$OUT/table.txt"
  # unfinished: how far it got; the strong preset: its runs' error curves and epoch times even when it finished
  if [ "$STUDY_RC" != 0 ] || [[ "$label" == strong* ]]; then
    progress "/tmp/mlflow-${label%%-*}.db" "$start" | tail -8 >> "$OUT/table.txt"
  fi
  tail -18 "$STUDY_LOG"
}
run_bench() {  # label, timeout, markdown heading, train_throughput args... (BENCH_SCRIPT: another bench script)
  local label=$1 limit=$2 heading=$3; shift 3
  local start script=${BENCH_SCRIPT:-bench/train_throughput.py}
  start=$(date +%s.%N)
  echo -e "\n## $heading\n" >> "$OUT/throughput.md"
  [ "$script" = bench/train_throughput.py ] && set -- --device "$DEVICE" "$@"
  timeout -k 20 "$limit" "$PYTHON" "$script" "$@" >> "$OUT/throughput.md" 2>> "$OUT/throughput.log"
  echo "$label | rc=$? | process wall $(seconds_since "$start")s (limit ${limit}s)" >> "$OUT/table.txt"
  tail -4 "$OUT/throughput.log"
}
STRONG_RC=""; STRONG_WALL=""; STRONG_LOG=""
for stage in "${STAGES[@]}"; do
  case "$stage" in
    strong)
      limit=$(fits strong 360 200) || continue  # past 6 minutes its 5-minute target is missed anyway
      run_study strong "$limit" --config strong --fresh "${STRONG_SET[@]}"
      STRONG_RC=$STUDY_RC; STRONG_WALL=$STUDY_WALL; STRONG_LOG=$STUDY_LOG ;;
    seed)
      limit=$(fits seed-fresh 100 70) || continue
      run_study seed-fresh "$limit" --config "$SEED_CONFIG" --fresh ;;
    resumed)
      limit=$(fits seed-resumed 80 60) || continue
      run_study seed-resumed "$limit" --config "$SEED_CONFIG" ;;  # same stores: every fold reused
    folds)
      limit=$(fits folds-5-epochs 100 50) || continue
      run_bench folds-5-epochs "$limit" "batched folds over $FOLD_EPOCHS epochs, as the seed study's CV trains them (seed model)" \
        --models seed "${FOLD_ARGS[@]}" --epochs "$FOLD_EPOCHS" --no-fit --cuda-graph on --norm both ;;
    throughput)
      limit=$(fits train-throughput 120 60) || continue
      run_bench train-throughput "$limit" "fit vs bare loop, batched folds over 1 epoch (seed model)" \
        --models seed "${FIT_ARGS[@]}" ;;
    bigger)
      limit=$(fits throughput-bigger 120 70) || continue
      run_bench throughput-bigger "$limit" "fit vs bare loop, batched folds over 1 epoch (dim-64 model)" \
        --models bigger "${FIT_ARGS[@]}" ;;
    profile-strong)
      limit=$(fits profile-strong 90 45) || continue
      BENCH_SCRIPT=bench/profile_step.py run_bench profile-strong "$limit" \
        "profile: the strong preset's training step (bench/profile_step.py)" \
        --config strong "${PROFILE_STRONG_ARGS[@]}" ;;
    profile)
      limit=$(fits profile 60 40) || continue
      run_bench profile "$limit" "profile: one stacked run of 1 and of 3 folds (seed model)" \
        --models seed "${FIT_ARGS[@]}" --no-fit --no-batched --profile ;;
    strong-tuned)
      [ "$STRONG_RC" = 0 ] || { echo "strong-tuned | skipped: no finished strong run in this call" >> "$OUT/table.txt"; continue; }
      epochs=$("$PYTHON" bench/gpu_check_tune.py --log "$STRONG_LOG" --wall "$STRONG_WALL" --target "$STRONG_TARGET" \
               --left "$(left)" "${STRONG_SET[@]}" 2>> "$OUT/table.txt") || continue
      limit=$(fits "strong-tuned" 360 100) || continue
      run_study strong-tuned "$limit" --config strong --fresh "${STRONG_SET[@]}" --set "train.epochs=$epochs" ;;
  esac
done

"$PYTHON" bench/gpu_verdict.py "$OUT" >> "$OUT/table.txt"  # $OUT holds at most 8 files: the verdict goes here
echo; echo "=== GPU check: ${STAGES[*]}, $(( $(date +%s) - T0 ))s ==="
cat "$OUT/machine.txt" "$OUT/table.txt"
[ -s "$OUT/throughput.md" ] && { echo; cat "$OUT/throughput.md"; }
exit 0
