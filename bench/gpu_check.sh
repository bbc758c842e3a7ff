#!/usr/bin/env bash
# One-shot check on a machine with one NVIDIA GPU, Python 3.12, torch preinstalled and no package registry.
# Expects (carried beside the checkout, git-ignored): .whl/ from `make wheelhouse` (the wheels the study needs that
# the machine's image lacks) and .mnist/ with the four MNIST files xz-compressed. Runs the seed study fresh, then
# resumed; bench/train_throughput.py on CUDA; the strong preset when configs/strong.yaml exists. About 12 minutes
# at most; prints one table at the end, logs go to $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# Only the wheels whose distribution the machine lacks: its own numpy, scipy, onnx, pytest... stay as they are.
python3 - > "$OUT/wheels.txt" <<'EOF'
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
grep -v '^#' "$OUT/wheels.txt" | xargs -r python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
mkdir -p /tmp/data/MNIST/raw
for f in .mnist/*.xz; do xz -dc "$f" > "/tmp/data/MNIST/raw/$(basename "$f" .xz)"; done
export VITFLOW_DATA_DIR=/tmp/data PREFECT_HOME=/tmp/prefect-home
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, prefect, mlflow, onnxruntime as o; print('torch', torch.__version__, 'prefect', prefect.__version__, 'mlflow', mlflow.__version__, 'ort', o.__version__, o.get_available_providers())"

seconds_since() { python3 -c "import time; print(f'{time.time() - $1:.1f}')"; }
run_study() {  # label, extra args...
  local label=$1; shift
  local start=$(date +%s.%N)
  MLFLOW_TRACKING_URI="sqlite:////tmp/mlflow-$label.db" timeout 420 python3 -m flows.cli run "$@" > "$OUT/$label.log" 2>&1
  local rc=$?
  local acc=$(grep -o 'Test accuracy (ONNX Runtime, [A-Za-z]*): [0-9.]*%' "$OUT/$label.log" | tail -1)
  local timing=$(grep -o 'Wall time: .*' "$OUT/$label.log" | tail -1)
  echo "$label | rc=$rc | process wall $(seconds_since "$start")s | $acc | $timing" >> "$OUT/table.txt"
  tail -18 "$OUT/$label.log"
}
: > "$OUT/table.txt"
export VITFLOW_RESULTS_DIR=/tmp/results
run_study seed-fresh --config seed --fresh
run_study seed-resumed --config seed     # same study again: every fold comes from the result store

start=$(date +%s.%N)  # fit vs a bare loop, and 3 batched folds vs 3 sequential ones (stdout: the tables)
timeout 300 python3 bench/train_throughput.py --device cuda --images 20000 --repeats 3 \
  > "$OUT/throughput.md" 2> "$OUT/throughput.log"
echo "train-throughput | rc=$? | process wall $(seconds_since "$start")s" >> "$OUT/table.txt"
tail -5 "$OUT/throughput.log"

if [ -f configs/strong.yaml ]; then run_study strong --config strong --fresh; fi

echo; echo "=== GPU check ($(cat "$OUT/gpu.txt")) ==="; cat "$OUT/table.txt"; echo; cat "$OUT/throughput.md"
