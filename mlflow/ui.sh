#!/usr/bin/env bash
# Open the MLflow UI on the local store that `make search` writes (sqlite:///<workdir>/mlflow.db),
# bound to 127.0.0.1. For a shared tracking server use `make mlflow-server` (mlflow/server.sh).
#
#   MLFLOW_PORT               port                 (default 5000)
#   PRECISION_SEARCH_WORKDIR  the search's workdir (absolute; default: the workdir of PRECISION_SEARCH_CONFIG)
#   PRECISION_SEARCH_CONFIG   the config the search ran with (`make ui CONFIG=...` sets it); its `workdir`,
#                             anchored like every command does it (pipeline.config.SearchConfig.work_root).
#                             Neither set: <repo>/.precision-search, where the repo's presets write.
#   MLFLOW_BIN                the mlflow executable (default <repo>/.venv/bin/mlflow)
#
# A store that does not exist is refused (nothing is created): run `make search CONFIG=...` first.
# MLflow 3.17 opens its "Assistant" side panel once per browser on a local server; it covers the runs table.
# Close it once (x): the UI remembers (localStorage mlflow.assistant.fab.autoOpenedOnFirstLoad_v1). MLflow has
# no server setting that keeps it closed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
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
FROM="the default, <repo>/.precision-search"
if [[ -n "${PRECISION_SEARCH_WORKDIR:-}" ]]; then
  WORKDIR="$PRECISION_SEARCH_WORKDIR"; FROM="PRECISION_SEARCH_WORKDIR"
elif [[ -n "${PRECISION_SEARCH_CONFIG:-}" ]]; then
  PY="$(dirname "$MLFLOW")/python"; [[ -x "$PY" ]] || PY=python3
  WORKDIR="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'import sys
from pipeline.config import load_config
print(load_config(sys.argv[1], check_imports=False).work_root)' "$PRECISION_SEARCH_CONFIG")" || {
    echo "mlflow/ui.sh: could not read the workdir of $PRECISION_SEARCH_CONFIG (see above)" >&2; exit 2; }
  FROM="the workdir of config $PRECISION_SEARCH_CONFIG"
else
  WORKDIR="$ROOT/.precision-search"
fi
DB="$WORKDIR/mlflow.db"
if [[ ! -f "$DB" ]]; then
  echo "mlflow/ui.sh: no MLflow store at $DB ($FROM); nothing was created." >&2
  echo "  run the search first (make search CONFIG=...), or point at its store: make ui CONFIG=<the config it ran" \
       "with>, or PRECISION_SEARCH_WORKDIR=<its workdir>, or MLFLOW_TRACKING_URI=http://... for a server" >&2
  exit 2
fi
mkdir -p "$WORKDIR/mlartifacts"
echo "MLflow UI: http://127.0.0.1:$PORT  (store: sqlite:///$DB)" >&2
# The search logs artifacts into <workdir>/mlartifacts by absolute path; the UI serves them from there.
exec "$MLFLOW" ui --backend-store-uri "sqlite:///$DB" --artifacts-destination "$WORKDIR/mlartifacts" \
  --host 127.0.0.1 --port "$PORT" --workers 1 "$@"
