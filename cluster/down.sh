#!/usr/bin/env bash
# `make cluster-down`: stop what cluster/up.sh started (only that: other Ray instances on this host are left
# alone, so no `ray stop`), and remove cluster/.env. The PostgreSQL databases are kept (the study lives there);
# CLUSTER_DROP_DB=1 drops them too.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${VENV_BIN:-$ROOT/.venv/bin}"
STATE="$HERE/.state"
ENV_FILE="$HERE/.env"
[[ -f "$ENV_FILE" ]] && set -a && . "$ENV_FILE" && set +a
RAY_PORT="${CLUSTER_RAY_PORT:-6390}"

if [[ -f "$STATE/mlflow.pid" ]]; then
  pid="$(cat "$STATE/mlflow.pid")"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  rm -f "$STATE/mlflow.pid"
fi
# Every process of this cluster names its Ray session directory on its command line.
if [[ -f "$STATE/ray-session" ]]; then
  session="$(cat "$STATE/ray-session")"
  if [[ "$session" =~ ^session_[0-9_-]+$ ]]; then
    pkill -TERM -f -- "$session" 2>/dev/null
    for _ in $(seq 1 20); do pgrep -f -- "$session" >/dev/null || break; sleep 0.5; done
    pkill -KILL -f -- "$session" 2>/dev/null
  fi
  rm -f "/tmp/ps-cluster-$RAY_PORT/ray_current_cluster"
  rm -f "$STATE/ray-session"
fi
if [[ "${CLUSTER_DROP_DB:-0}" == 1 && -n "${PRECISION_SEARCH_STORAGE:-}" ]]; then
  "$BIN/python" - "$PRECISION_SEARCH_STORAGE" "${MLFLOW_BACKEND_STORE_URI:-}" <<'PY'
import sys, psycopg
url = sys.argv[1].replace("postgresql+psycopg://", "postgresql://")
base, db = url.rsplit("/", 1)
with psycopg.connect(base + "/postgres", autocommit=True) as conn:
    for name in (db, db.replace("_optuna", "_mlflow")):
        conn.execute(f'drop database if exists "{name}" with (force)')
        print(f"dropped database {name}")
PY
fi
rm -f "$ENV_FILE"
echo "cluster down (Ray on port $RAY_PORT and the MLflow server stopped; cluster/.env removed)"
