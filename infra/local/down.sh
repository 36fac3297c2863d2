#!/usr/bin/env bash
# Stop what up.sh started. With RAY_TEMP_DIR (as given to up.sh), only the Ray cluster whose files live there;
# without it, `ray stop` (every Ray cluster of this user on this machine).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${FEWSTEP_STATE:-$ROOT/.infra}
BIN=${FEWSTEP_BIN:-$ROOT/.venv/bin}
if [ -n "${RAY_TEMP_DIR:-}" ]; then
  # the GCS, raylet, dashboard and monitors name their session directory, the Ray client server the GCS address;
  # workers and agents are the raylet's children
  pids=$(pgrep -f -- "$RAY_TEMP_DIR/session_|ray.util.client.server --address=127.0.0.1:${RAY_PORT:-6379} " || true)
  if [ -n "$pids" ]; then
    children=$(for p in $pids; do pgrep -P "$p"; done)
    kill -TERM $pids $children 2>/dev/null
    for _ in $(seq 30); do kill -0 $pids $children 2>/dev/null || break; sleep 0.5; done
    kill -KILL $pids $children 2>/dev/null
    echo "ray: stopped (the cluster in $RAY_TEMP_DIR)"
  fi
else
  RAY_AUTH_MODE=token "$BIN/ray" stop >/dev/null 2>&1 && echo "ray: stopped"
fi
if [ -f "$STATE/mlflow.pid" ]; then
  pid=$(cat "$STATE/mlflow.pid")
  # the server's gunicorn/uvicorn workers are its children
  pkill -TERM -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null && echo "mlflow: stopped"
  rm -f "$STATE/mlflow.pid"
fi
exit 0
