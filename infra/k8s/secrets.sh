#!/usr/bin/env bash
# Create the Secrets the manifests read, from your environment (values go through pipes: not into files, git or
# kubectl's argument list):
#   MLFLOW_DB_URI="$(cat my-db-uri)" \
#   AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... bash infra/k8s/secrets.sh
set -euo pipefail
NS=${NS:-fewstep}
: "${MLFLOW_DB_URI:?a postgresql:// SQLAlchemy URI, password included, for the MLflow backend store}"
: "${AWS_ACCESS_KEY_ID:?object-store key for MLflow artifacts and the data shards}"
: "${AWS_SECRET_ACCESS_KEY:?object-store secret}"
MLFLOW_URI=${MLFLOW_URI:-http://mlflow.$NS.svc:5000}

kubectl get namespace "$NS" >/dev/null 2>&1 || kubectl create namespace "$NS"
apply() { kubectl -n "$NS" create secret generic "$@" --dry-run=client -o yaml | kubectl apply -f -; }
# A fresh random Ray token unless one exists (every node and client shares it).
if ! kubectl -n "$NS" get secret fewstep-ray-token >/dev/null 2>&1; then
  apply fewstep-ray-token --from-file=auth_token=<(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
fi
apply fewstep-mlflow --from-file=tracking_uri=<(printf %s "$MLFLOW_URI")
apply fewstep-mlflow-db --from-file=backend_store_uri=<(printf %s "$MLFLOW_DB_URI")
apply fewstep-s3 --from-file=access_key_id=<(printf %s "$AWS_ACCESS_KEY_ID") \
  --from-file=secret_access_key=<(printf %s "$AWS_SECRET_ACCESS_KEY")
echo "secrets in namespace $NS: fewstep-ray-token fewstep-mlflow fewstep-mlflow-db fewstep-s3"
