#!/usr/bin/env bash
# Stop what up.sh started.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${FEWSTEP_STATE:-$ROOT/.infra}
BIN=${FEWSTEP_BIN:-$ROOT/.venv/bin}
RAY_AUTH_MODE=token "$BIN/ray" stop >/dev/null 2>&1 && echo "ray: stopped"
if [ -f "$STATE/mlflow.pid" ]; then
  pid=$(cat "$STATE/mlflow.pid")
  # the server's gunicorn/uvicorn workers are its children
  pkill -TERM -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null && echo "mlflow: stopped"
  rm -f "$STATE/mlflow.pid"
fi
exit 0
