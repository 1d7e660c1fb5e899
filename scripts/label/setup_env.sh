#!/usr/bin/env bash
# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
# Create (or check) the MONAI Label 0.8.5 environment beside the bundle, idempotently:
#   bash scripts/label/setup_env.sh            # -> .venv-label
#   LABEL_VENV=/path/to/venv bash scripts/label/setup_env.sh
# It installs the complete lock requirements-label.txt with --no-deps (monailabel's sam2/mlflow/openslide
# dependencies are left out on purpose) and then imports what the server needs. A venv whose stamp matches the
# lock file is kept as it is (seconds); a changed lock reinstalls into it. Needs Python 3.11 (PYTHON=...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LABEL_VENV:-$ROOT/.venv-label}"
PYTHON="${PYTHON:-python3.11}"
LOCK="$ROOT/requirements-label.txt"
STAMP="$VENV/.requirements-label.sha256"

want="$(sha256sum "$LOCK" | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "setup_env: $VENV is up to date with requirements-label.txt"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || { echo "setup_env: $PYTHON not found; set PYTHON to a Python 3.11 interpreter" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
echo "setup_env: installing requirements-label.txt into $VENV (torch 2.14.1 is ~5.5 GB; a few minutes)"
LOG="$VENV/.pip-install.log"
if ! "$VENV/bin/python" -m pip install --quiet --no-deps -r "$LOCK" >"$LOG" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$LOG" >&2
  echo "setup_env: pip install failed (log: $LOG)" >&2
  exit 1
fi
"$VENV/bin/python" - <<'EOF'
import importlib
for name in ("torch", "torchvision", "monai", "monailabel", "itk", "SimpleITK", "pydicom_seg", "girder_client",
             "fastapi", "uvicorn", "ignite", "nibabel", "yaml"):
    importlib.import_module(name)
import monai, monailabel, pydicom, torch
assert monailabel.__version__.startswith("0.8.5"), monailabel.__version__
assert pydicom.__version__.startswith("2."), f"pydicom {pydicom.__version__}: pydicom-seg needs pydicom<3"
print(f"setup_env: monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}, "
      f"pydicom {pydicom.__version__}")
EOF
echo "$want" > "$STAMP"
echo "setup_env: $VENV ready"
