#!/usr/bin/env bash
# One-shot check on a machine with one NVIDIA GPU, Python 3.12, torch preinstalled and no package registry.
#
#   bench/gpu_check.sh [seed] [throughput] [strong]      # the stages to run, in this order; default: all three
#
# Expects (carried beside the checkout, git-ignored): .whl/ from `make wheelhouse` (the wheels the study needs that
# the machine's image lacks) and .mnist/ with the four MNIST files xz-compressed (`make wheelhouse` writes both).
# Stages:
#   seed        the seed study through the flow, fresh, then again resumed (every fold from the result store)
#   throughput  bench/train_throughput.py on CUDA: fit vs a bare loop, 3 batched folds vs 3 sequential ones
#   strong      the strong preset (configs/strong.yaml) through the flow
# seed + throughput take about 3-4 minutes and strong about 5-6, so with a 10-minute limit per device call run
# them as two calls on the same warm machine: `bench/gpu_check.sh strong`, then `bench/gpu_check.sh seed
# throughput` (either order; the stage timeouts bound each call). The wheels go to /tmp/site once per machine. Logs and table.txt go to $OUT; the table is printed last.
#
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU at toy sizes (smoke preset, a 1-epoch strong preset on a
# subset): a rehearsal of the script itself, e.g. in a Python 3.12 environment that mirrors the GPU machine's
# image, so that the device time goes to the measurements. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"; mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
STAGES=("$@"); [ ${#STAGES[@]} -eq 0 ] && STAGES=(seed throughput strong)
for stage in "${STAGES[@]}"; do
  case "$stage" in seed|throughput|strong) ;; *) echo "unknown stage '$stage': use seed, throughput, strong" >&2; exit 2;; esac
done
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

# Only the wheels whose distribution the machine lacks: its own numpy, scipy, onnx, pytest... stay as they are.
# Byte-compiled at install, so that the first study does not pay for it.
# A warm machine that ran this before keeps /tmp/site; the marker names the wheel set that was installed.
SITE=/tmp/site
SETUP=/tmp/gpu-check-setup; mkdir -p "$SETUP"  # install logs stay off $OUT (a device call returns 8 files at most)
if ! cmp -s <(ls .whl) "$SITE/.vitflow-wheels" 2>/dev/null; then
  "$PYTHON" - > "$SETUP/wheels.txt" <<'EOF'
import importlib.metadata as metadata
from pathlib import Path

from packaging.utils import parse_wheel_filename

for wheel in sorted(Path(".whl").glob("*.whl")):
    name = parse_wheel_filename(wheel.name)[0]
    try:
        print(f"# {name} {metadata.version(name)} is installed: {wheel.name} skipped")
    except metadata.PackageNotFoundError:
        print(wheel)
EOF
  grep -v '^#' "$SETUP/wheels.txt" | xargs -r "$PYTHON" -m pip install -q --no-index --no-deps \
    --no-cache-dir --upgrade --target "$SITE" > "$SETUP/pip.log" 2>&1 || { tail -20 "$SETUP/pip.log"; exit 1; }
  ls .whl > "$SITE/.vitflow-wheels"
fi
export PYTHONPATH="$SITE:$PWD"
DATA=/tmp/vitflow-data
if [ ! -s "$DATA/MNIST/raw/t10k-labels-idx1-ubyte" ]; then
  mkdir -p "$DATA/MNIST/raw"
  for f in .mnist/*.xz; do xz -dc "$f" > "$DATA/MNIST/raw/$(basename "$f" .xz)"; done
fi
export VITFLOW_DATA_DIR="$DATA" PREFECT_HOME=/tmp/prefect-home VITFLOW_RESULTS_DIR=/tmp/vitflow-results
# Prefect's database, as `make install` and the Docker image create it: not part of any study's time.
[ -s "$PREFECT_HOME/prefect.db" ] || "$PYTHON" -m prefect server database upgrade -y > "$SETUP/prefect-db.log" 2>&1 \
  || { tail -20 "$SETUP/prefect-db.log"; exit 1; }

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; SEED_CONFIG=smoke; THROUGHPUT_ARGS=(--images 2000 --repeats 1 --profile)
  FOLD_ARGS=(--models seed --images 1000 --epochs 2 --repeats 1)
  STRONG_SET=(--set train.epochs=1 --set cv.epochs=1 --set data.train_subset=3000 --set data.test_subset=1000
              --set train.compile=off --set train.batch_size=128)
  echo "dry run on the CPU ($(nproc) cores)" > "$OUT/gpu.txt"
else
  DEVICE=cuda; SEED_CONFIG=seed; THROUGHPUT_ARGS=(--images 20000 --repeats 3 --profile); STRONG_SET=()
  FOLD_ARGS=(--models seed --images 20000 --epochs 5 --repeats 3)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
fi
"$PYTHON" -c "import sys, torch, prefect, mlflow, onnx, onnxruntime as o; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'prefect', prefect.__version__, 'mlflow', mlflow.__version__, 'onnx', onnx.__version__, 'ort', o.__version__, o.get_available_providers())" | tee "$OUT/versions.txt"
[ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" && {
  echo "torch sees no CUDA device: not a GPU check (GPU_CHECK_DRY_RUN=1 rehearses on the CPU)"; exit 1; }

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
    print(f"  progress: {name} {status} at {(start - t0) / 1000:.0f} s: {len(errors)} epoch(s), error of the "
          f"last {min(len(errors), 4)}: {' '.join(f'{e:.4f}' for e in errors[-4:])}, best {min(errors):.4f}, "
          f"{sum(seconds) / max(len(seconds), 1):.2f} s/epoch")
EOF
}
run_study() {  # label, timeout, extra args...
  local label=$1 limit=$2; shift 2
  local start
  start=$(date +%s.%N)
  MLFLOW_TRACKING_URI="sqlite:////tmp/mlflow-${label%%-*}.db" timeout "$limit" "$PYTHON" -m flows.cli run "$@" \
    > "$OUT/$label.log" 2>&1
  local rc=$?
  local acc timing
  acc=$(grep -o 'Test accuracy (ONNX Runtime, [A-Za-z]*): [0-9.]*%' "$OUT/$label.log" | tail -1)
  timing=$(grep -o 'Wall time: .*' "$OUT/$label.log" | tail -1)
  echo "$label | rc=$rc | process wall $(seconds_since "$start")s | $(phases "$start" "$OUT/$label.log") | $acc | $timing" \
    >> "$OUT/table.txt"
  grep -m3 -o -E 'CUDA graph capture failed.*|augmentation generators did not advance.*|fused attention kernel failed.*' "$OUT/$label.log" | cut -c1-300 >> "$OUT/table.txt"
  # unfinished: how far it got; the strong preset: its runs' errors and epoch times even when it finished
  if [ "$rc" != 0 ] || [ "$label" = strong ]; then progress "/tmp/mlflow-${label%%-*}.db" "$start" | tail -8 >> "$OUT/table.txt"; fi
  tail -18 "$OUT/$label.log"
}
: > "$OUT/table.txt"
for stage in "${STAGES[@]}"; do
  case "$stage" in
    seed)
      run_study seed-fresh 150 --config "$SEED_CONFIG" --fresh
      run_study seed-resumed 90 --config "$SEED_CONFIG" ;;  # the second run: same stores, every fold reused
    throughput)
      start=$(date +%s.%N)  # fit vs a bare loop, and 3 batched folds vs 3 sequential ones (stdout: the tables)
      timeout 150 "$PYTHON" bench/train_throughput.py --device "$DEVICE" "${THROUGHPUT_ARGS[@]}" \
        > "$OUT/throughput.md" 2> "$OUT/throughput.log"
      echo "train-throughput | rc=$? | process wall $(seconds_since "$start")s" >> "$OUT/table.txt"
      tail -5 "$OUT/throughput.log"
      # the folds again over 5 epochs, as the seed study's CV trains them: fixed costs per run weigh less
      start=$(date +%s.%N)
      echo -e "\n## batched folds over 5 epochs (seed model)\n" >> "$OUT/throughput.md"
      timeout 150 "$PYTHON" bench/train_throughput.py --device "$DEVICE" "${FOLD_ARGS[@]}" --no-fit \
        >> "$OUT/throughput.md" 2>> "$OUT/throughput.log"
      echo "folds-5-epochs | rc=$? | process wall $(seconds_since "$start")s" >> "$OUT/table.txt" ;;
    strong)
      run_study strong 500 --config strong --fresh "${STRONG_SET[@]}" ;;  # the call's 600 s include the set-up
  esac
done

echo; echo "=== GPU check: ${STAGES[*]} ($(cat "$OUT/gpu.txt")) ==="; cat "$OUT/versions.txt"; cat "$OUT/table.txt"
[ -s "$OUT/throughput.md" ] && { echo; cat "$OUT/throughput.md"; }
exit 0
