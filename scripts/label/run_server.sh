#!/usr/bin/env bash
# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
# Serve this bundle from MONAI Label 0.8.5 (the monaibundle sample app), offline, on the loopback interface.
#   bash scripts/label/run_server.sh                 # http://127.0.0.1:8000, model "mambaclinix"
#   PORT=8001 STUDIES=/data/my_images bash scripts/label/run_server.sh
#   CORS_ORIGINS="http://localhost:3000" bash scripts/label/run_server.sh    # a browser viewer served elsewhere
# Environment: HOST (127.0.0.1), PORT (8000), NAME (mambaclinix), APP_DIR (.monailabel/app),
# STUDIES ($HOME/mambaclinix-studies: the datastore, kept outside the bundle and the app (the server refuses a
# nested one); an empty one gets the MNI demo images when data/mni exists), CORS_ORIGINS (none),
# ALLOWED_HOSTS (extra Host names), LABEL_VENV (.venv-label), OMP_WAIT_POLICY (PASSIVE; default: the OpenMP
# runtime's own). See docs/monailabel.md for the 3D Slicer steps
# and the guard that refuses ids leaving the datastore.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
NAME="${NAME:-mambaclinix}"
APP_DIR="${APP_DIR:-$ROOT/.monailabel/app}"
STUDIES="${STUDIES:-$HOME/mambaclinix-studies}"
export LABEL_VENV="${LABEL_VENV:-$ROOT/.venv-label}"
# waiting OpenMP threads sleep instead of spinning, as under the Makefile; OMP_WAIT_POLICY=default: the runtime's own
if [[ "${OMP_WAIT_POLICY:-}" == default ]]; then
  unset OMP_WAIT_POLICY
else
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
fi
PY="$LABEL_VENV/bin/python"

bash "$ROOT/scripts/label/setup_env.sh"
# MONAI Label lists a bundle only when models/model.pt exists: start from fresh weights when none was trained yet
if [[ ! -f "$ROOT/models/model.pt" ]]; then
  echo "run_server: models/model.pt is missing; writing freshly initialised weights (train before trusting them)"
  "$PY" -m scripts.label.app init-model --bundle "$ROOT"
fi
"$PY" -m scripts.label.app prepare --app "$APP_DIR" --bundle "$ROOT" --name "$NAME"
seed=()
if compgen -G "$ROOT/data/mni/images/*.nii.gz" >/dev/null; then
  seed=(--seed-images "$ROOT"/data/mni/images/*.nii.gz)
fi
read -r -a cors <<< "${CORS_ORIGINS:-}"
read -r -a hosts <<< "${ALLOWED_HOSTS:-}"
exec "$PY" -m scripts.label.app serve --app "$APP_DIR" --studies "$STUDIES" --name "$NAME" --host "$HOST" \
  --port "$PORT" "${seed[@]}" --cors_origins "${cors[@]}" --allowed_hosts "${hosts[@]}"
