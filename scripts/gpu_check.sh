#!/usr/bin/env bash
# Prove the CUDA path on a one-GPU machine, with no network, in under 8 minutes; one JSON of results.
#
#   scripts/gpu_check.sh [OUT_DIR] [--only runtime,pytest,speed]
#       the GPU machine: its python3 (torch, transformers, accelerate), the repo on PYTHONPATH,
#       no `make setup`; --only reruns some parts
#   DEVICE=cpu scripts/gpu_check.sh [OUT_DIR]
#       the dry run: every stage on the CPU with tiny shapes (what CI runs)
#
# OUT_DIR defaults to $OUT, else artifacts/gpu-check. PYTHON picks the interpreter (default: the
# repo's .venv where there is one, else python3). What each stage does: benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
out="${OUT:-artifacts/gpu-check}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out="$1"; shift; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.gpu_check --out "$out" ${DEVICE:+--device "$DEVICE"} "$@"
