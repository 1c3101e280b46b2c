#!/usr/bin/env bash
# Open the MLflow UI on the local store that `make search` writes (sqlite:///<workdir>/mlflow.db),
# bound to 127.0.0.1. For a shared tracking server use `make mlflow-server` (mlflow/server.sh).
#
#   MLFLOW_PORT               port                 (default 5000)
#   PRECISION_SEARCH_WORKDIR  the search's workdir (default <repo>/.precision-search, the configs' `workdir`)
#   MLFLOW_BIN                the mlflow executable (default <repo>/.venv/bin/mlflow)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
WORKDIR="${PRECISION_SEARCH_WORKDIR:-$ROOT/.precision-search}"
PORT="${MLFLOW_PORT:-5000}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"  # GenAI job runner: unused
if [[ -n "${MLFLOW_BIN:-}" ]]; then MLFLOW="$MLFLOW_BIN"
elif [[ -x "$ROOT/.venv/bin/mlflow" ]]; then MLFLOW="$ROOT/.venv/bin/mlflow"
else MLFLOW="$(command -v mlflow || true)"; fi
if [[ -z "$MLFLOW" || ! -x "$MLFLOW" ]]; then
  echo "mlflow/ui.sh: mlflow is not installed: run 'make venv' (or set MLFLOW_BIN)" >&2; exit 2
fi

if [[ "${MLFLOW_TRACKING_URI:-}" == http* ]]; then
  echo "MLFLOW_TRACKING_URI points at a tracking server: open $MLFLOW_TRACKING_URI in a browser instead." >&2
  exit 0
fi
DB="$WORKDIR/mlflow.db"
if [[ ! -f "$DB" ]]; then
  echo "note: $DB does not exist yet (run 'make search' first); the UI starts on an empty store." >&2
fi
mkdir -p "$WORKDIR/mlartifacts"
echo "MLflow UI: http://127.0.0.1:$PORT  (store: sqlite:///$DB)" >&2
# The search logs artifacts into <workdir>/mlartifacts by absolute path; the UI serves them from there.
exec "$MLFLOW" ui --backend-store-uri "sqlite:///$DB" --artifacts-destination "$WORKDIR/mlartifacts" \
  --host 127.0.0.1 --port "$PORT" --workers 1 "$@"
