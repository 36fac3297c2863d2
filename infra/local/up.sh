#!/usr/bin/env bash
# Start the local stack: a Ray head with token auth, every Ray process listening on 127.0.0.1 only (dashboard/job
# server on 127.0.0.1:8265), and an MLflow tracking server + registry (sqlite) on 127.0.0.1:5000. Idempotent;
# `down.sh` stops both. Ports: RAY_PORT (GCS, 6379), RAY_DASHBOARD_PORT (8265), RAY_CLIENT_PORT (10001),
# RAY_AGENT_PORT (dashboard agent, 52365; 0 = any free one), MLFLOW_PORT (5000). RAY_TEMP_DIR (default: Ray's
# /tmp/ray) keeps a second stack's Ray files apart (down.sh then stops only that cluster).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${FEWSTEP_STATE:-$ROOT/.infra}
BIN=${FEWSTEP_BIN:-$ROOT/.venv/bin}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
RAY_PORT=${RAY_PORT:-6379}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
RAY_AGENT_PORT=${RAY_AGENT_PORT:-52365}
RAY_NUM_CPUS=${RAY_NUM_CPUS:-$(( $(nproc) * 2 ))}   # > CPUs the workers reserve: Ray Data keeps a budget
mkdir -p "$STATE"
export RAY_AUTH_MODE=token
# Ray's single-machine mode: the node's IP is 127.0.0.1, so the GCS, raylet, agents and workers listen on
# loopback only (with just --node-ip-address 127.0.0.1, Ray on Linux uses the machine's address and listens on
# all interfaces). A single-machine head accepts no other nodes.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export MLFLOW_DISABLE_TELEMETRY=true
export PATH="$BIN:$PATH"   # `ray job submit -- python ...` runs the venv's python

if "$BIN/ray" status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1; then
  echo "ray: already running on 127.0.0.1:$RAY_PORT"
else
  "$BIN/ray" get-auth-token --generate >/dev/null
  "$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
    --ray-client-server-port "$RAY_CLIENT_PORT" --dashboard-agent-listen-port "$RAY_AGENT_PORT" \
    ${RAY_TEMP_DIR:+--temp-dir "$RAY_TEMP_DIR"} \
    --num-cpus "$RAY_NUM_CPUS" --object-store-memory $((1024 * 1024 * 1024)) \
    --disable-usage-stats >"$STATE/ray-start.log" 2>&1 || { cat "$STATE/ray-start.log"; exit 1; }
  echo "ray: head started (dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT, token auth on, 127.0.0.1 only)"
fi

if curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null; then
  echo "mlflow: already running on http://127.0.0.1:$MLFLOW_PORT"
else
  # MLflow 3's job runner (~7 polling huey consumers, ~0.4 core here) is not used by fewstep: off
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 \
    --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlartifacts" \
    >"$STATE/mlflow.log" 2>&1 &
  echo $! >"$STATE/mlflow.pid"
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && break
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || { tail -20 "$STATE/mlflow.log"; exit 1; }
  echo "mlflow: server started on http://127.0.0.1:$MLFLOW_PORT (store $STATE)"
fi
