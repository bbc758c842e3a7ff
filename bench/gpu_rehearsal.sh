#!/usr/bin/env bash
# Rehearse bench/gpu_check.sh on this machine's CPU before spending GPU time on it:
#
#   make gpu-rehearsal                          # all stages; or: bench/gpu_rehearsal.sh strong
#
# Builds (once) a Python 3.12 environment that mirrors the GPU machine's image: torch, torchvision, numpy, onnx,
# onnxruntime at that image's versions and the other distributions it holds (bench/wheelhouse.py,
# GPU_IMAGE_HAS and GPU_IMAGE_PINNED), then runs gpu_check.sh with GPU_CHECK_DRY_RUN=1: the same wheel install
# from .whl/ (no registry), the same MNIST unpacking from .mnist/, the same flows at toy sizes on the CPU.
# What it catches: a wheel the image needs but .whl/ lacks, code that breaks on Python 3.12 or on the image's
# older torch/onnx/onnxruntime, a broken stage of the script. What it cannot: anything CUDA.
# PYTHON312 names the interpreter (default python3.12); REHEARSAL_VENV the environment (default .gpu-rehearsal).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${REHEARSAL_VENV:-.gpu-rehearsal}"
[ -d .whl ] && [ -d .mnist ] || { echo "no .whl/ or .mnist/: run 'make wheelhouse' first" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  # `command -v` is not enough: pyenv's shim exists for every version but runs only the selected ones.
  "${PYTHON312:-python3.12}" -c 'import sys; assert sys.version_info[:2] == (3, 12)' > /dev/null 2>&1 || {
    echo "no Python 3.12 interpreter as '${PYTHON312:-python3.12}': set PYTHON312 to one" \
      "(the GPU machine runs 3.12; with pyenv: PYTHON312=\$(pyenv root)/versions/3.12.x/bin/python3.12)" >&2; exit 2; }
  "${PYTHON312:-python3.12}" -m venv "$VENV.partial"
  # shellcheck disable=SC2046
  "$VENV.partial/bin/python" -m pip install -q $(.venv/bin/python bench/wheelhouse.py --image-requirements)
  mv "$VENV.partial" "$VENV"  # only a complete environment gets the final name
fi
rm -rf /tmp/site  # install from .whl/ as on a fresh GPU machine
GPU_CHECK_DRY_RUN=1 PYTHON="$PWD/$VENV/bin/python" OUT="${OUT:-/tmp/gpu-rehearsal}" bench/gpu_check.sh "$@"
