#!/usr/bin/env bash
# Bring up the GPU cluster of aws-gpu.yaml and submit a training run to it, token auth on.
#   PRESET=imagenet64-ict NUM_WORKERS=64 DATA=s3://fewstep-data/imagenet64 bash infra/cluster/submit.sh
# MLFLOW_TRACKING_URI must name a tracking server the cluster reaches (e.g. the one of infra/k8s/mlflow.yaml);
# it is passed to the job's environment, never written into a file.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/aws-gpu.yaml}
PRESET=${PRESET:-imagenet64-ict}
NUM_WORKERS=${NUM_WORKERS:-64}
DATA=${DATA:-s3://fewstep-data/imagenet64}
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to the MLflow server the cluster reaches}"
export RAY_AUTH_MODE=token

[ -s "$HOME/.ray/auth_token" ] || ray get-auth-token --generate >/dev/null
ray up -y "$CONFIG"
ray dashboard "$CONFIG" >/dev/null 2>&1 &   # SSH-forwards the head's 127.0.0.1:8265 here
FORWARD=$!
trap 'kill "$FORWARD" 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf http://127.0.0.1:8265 >/dev/null && break; sleep 2; done

ray job submit --address http://127.0.0.1:8265 \
  --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\"}}" -- \
  python -m pipelines.train --preset "$PRESET" --run-name "$PRESET" \
    --set engine.num_workers="$NUM_WORKERS" --set engine.use_gpu=true \
    --set engine.storage_path=/mnt/fewstep/runs --set engine.max_failures=3 \
    --set data.shards="$DATA/train" --set data.test_shards="$DATA/val" \
    --output-dir /mnt/fewstep/runs/outputs
