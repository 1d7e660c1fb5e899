#!/usr/bin/env bash
# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
# Create (or check) the CPU test environment for the CUDA code paths, idempotently:
#   bash scripts/checks/setup_cuda_ref_env.sh             # -> .venv-cuda-ref
#   CUDA_REF_VENV=/path/to/venv bash scripts/checks/setup_cuda_ref_env.sh
# It installs requirements-dev.txt (the bundle's pins, torch CPU) and requirements-cuda-ref.txt (mamba-ssm's
# dependencies and the build tools), then builds requirements-cuda.txt (mamba-ssm, causal-conv1d) from their sources
# with their CUDA extensions skipped. The packages' Python code (autograd wrappers and the reference functions
# selective_scan_ref, mamba_inner_ref, causal_conv1d_ref) is then on disk; their compiled kernels are not, and
# tests/cuda_reference.py substitutes the reference functions for them. A venv whose stamp matches the three
# requirement files is kept as it is (seconds). Needs Python 3.11 (PYTHON=...) and the package registry.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${CUDA_REF_VENV:-$ROOT/.venv-cuda-ref}"
PYTHON="${PYTHON:-python3.11}"
LOCKS=("$ROOT/requirements-dev.txt" "$ROOT/requirements.txt" "$ROOT/requirements-cuda-ref.txt" "$ROOT/requirements-cuda.txt")
STAMP="$VENV/.requirements-cuda-ref.sha256"

want="$(cat "${LOCKS[@]}" | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "setup_cuda_ref_env: $VENV is up to date"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || { echo "setup_cuda_ref_env: $PYTHON not found; set PYTHON to a Python 3.11 interpreter" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
LOG="$VENV/.pip-install.log"
fail() {
  grep -v "is ignored: it is neither a file nor a directory" "$LOG" >&2 || true
  echo "setup_cuda_ref_env: $1 failed (log: $LOG)" >&2
  exit 1
}
echo "setup_cuda_ref_env: installing the bundle's requirements and mamba-ssm's dependencies into $VENV (~2 GB more than .venv)"
"$VENV/bin/python" -m pip install --quiet "pip==26.3" >"$LOG" 2>&1 || fail "pip upgrade"
"$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements-dev.txt" -r "$ROOT/requirements-cuda-ref.txt" >>"$LOG" 2>&1 \
  || fail "pip install of requirements-dev.txt + requirements-cuda-ref.txt"
echo "setup_cuda_ref_env: building mamba-ssm and causal-conv1d from source without their CUDA extensions"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  "$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps -r "$ROOT/requirements-cuda.txt" >>"$LOG" 2>&1 \
  || fail "the source build of requirements-cuda.txt"
(cd "$ROOT" && "$VENV/bin/python" -c "
from tests.cuda_reference import load_references
refs = load_references()
print('setup_cuda_ref_env: mamba-ssm %s and causal-conv1d %s import on CPU with their references' % refs.versions)
") || { echo "setup_cuda_ref_env: the reference functions do not import" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup_cuda_ref_env: $VENV ready"
