#!/usr/bin/env bash
# `make cluster-up`: the topology of a real cluster on this host, loopback only:
#   - a Ray cluster: one head + CLUSTER_WORKERS worker nodes (separate raylets), token authentication on;
#   - PostgreSQL for Optuna's RDB storage and as MLflow's backend store (the server already on 127.0.0.1:5432,
#     or CLUSTER_PG_URL);
#   - an MLflow tracking server on that PostgreSQL with a local artifact root.
# It writes cluster/.env (sourceable; `make search|ui|promote|front` read it while it exists) and prints the
# addresses. `make cluster-down` stops what this started and removes cluster/.env.
#
#   CLUSTER_WORKERS   worker nodes besides the head          (default 1: two nodes in all)
#   CLUSTER_CPUS      CPUs each node offers Ray               (default: this machine's cores / nodes, at least 1)
#   CLUSTER_RAY_PORT  Ray GCS port                            (default 6390; 6379 is often a Redis server's)
#   CLUSTER_MLFLOW_PORT  MLflow server port                   (default 5055)
#   CLUSTER_PG_URL    PostgreSQL server URL without database  (default postgresql://postgres@127.0.0.1:5432)
#   CLUSTER_DB_PREFIX database names <prefix>_optuna, <prefix>_mlflow (default precision_search)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${VENV_BIN:-$ROOT/.venv/bin}"
STATE="$HERE/.state"
ENV_FILE="$HERE/.env"
WORKERS="${CLUSTER_WORKERS:-1}"
NODES=$((WORKERS + 1))
CPUS="${CLUSTER_CPUS:-$(( $(nproc) / NODES ))}"; [[ "$CPUS" -ge 1 ]] || CPUS=1
RAY_PORT="${CLUSTER_RAY_PORT:-6390}"
# Its own temp dir (short: Ray's socket paths have a length limit), so that a plain `ray.init()` elsewhere on
# this host never attaches to this cluster by finding it in /tmp/ray.
RAY_TMP="/tmp/ps-cluster-$RAY_PORT"
MLFLOW_PORT="${CLUSTER_MLFLOW_PORT:-5055}"
PG_URL="${CLUSTER_PG_URL:-postgresql://postgres@127.0.0.1:5432}"
PREFIX="${CLUSTER_DB_PREFIX:-precision_search}"
mask() { sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#g'; }
die() { echo "cluster/up.sh: $*" >&2; exit 2; }

[[ -x "$BIN/ray" ]] || die "no virtualenv with Ray at $BIN: run 'make venv EXTRAS=dev,cluster' first"
"$BIN/python" -c "import psycopg" 2>/dev/null || die "the PostgreSQL driver is missing: $BIN/pip install -e '$ROOT[cluster]'"
[[ -f "$ENV_FILE" ]] && die "a cluster is already up ($ENV_FILE exists): 'make cluster-down' first"
mkdir -p "$STATE"

# --- PostgreSQL: reachable? create the two databases if missing -----------------------------------
"$BIN/python" - "$PG_URL" "$PREFIX" <<'PY' || exit 2
import sys
import psycopg
url, prefix = sys.argv[1], sys.argv[2]
base = url.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+psycopg2://", "postgresql://")
try:
    conn = psycopg.connect(base.rstrip("/") + "/postgres", autocommit=True, connect_timeout=5)
except Exception as exc:
    shown = base.split("@")[-1]
    sys.exit(f"cluster/up.sh: no PostgreSQL at {shown}: {exc}\n"
             "  start one (Debian: apt-get install postgresql && service postgresql start; or\n"
             "  docker run -d -p 127.0.0.1:5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15),\n"
             "  or point CLUSTER_PG_URL at yours, e.g. postgresql://user:password@host:5432")
with conn:
    for name in (f"{prefix}_optuna", f"{prefix}_mlflow"):
        if not conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone():
            conn.execute(f'create database "{name}"')
            print(f"created database {name}")
PY
STORAGE="${PG_URL%/}/${PREFIX}_optuna"
MLFLOW_STORE="${PG_URL%/}/${PREFIX}_mlflow"

# --- Ray: head + workers, token authentication, advertised on loopback ----------------------------
# Ray on Linux advertises a multi-node cluster's nodes on the machine's routable address even when told
# 127.0.0.1 (it refuses multi-node on loopback), and its gRPC servers listen on all interfaces: token
# authentication is what keeps other hosts out. The GCS address clients use stays 127.0.0.1.
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
[[ -f "$HOME/.ray/auth_token" || -n "${RAY_AUTH_TOKEN:-}" ]] || "$BIN/ray" get-auth-token --generate >/dev/null
# Each node stands for a machine: its own measurement lock (pipeline.measure.exclusive_measurement), so one
# node's timing windows serialise with its own trials, not with the other nodes' (they share this host's CPUs:
# timings on a local multi-node cluster are a topology test, not a benchmark of separate machines).
start_node() {  # start_node <log name> <ray start args...>
  local name="$1" log="$STATE/$1.log"; shift
  if ! PRECISION_SEARCH_MEASURE_LOCK="$STATE/measure-$name.lock" "$BIN/ray" start "$@" --temp-dir="$RAY_TMP" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" --disable-usage-stats >"$log" 2>&1; then
    tail -20 "$log" >&2; die "ray start failed (log: $log)"
  fi
}
start_node head --head --port="$RAY_PORT" --include-dashboard=false
# Every process of this cluster names its session directory: cluster/down.sh stops exactly those.
basename "$(readlink -f "$RAY_TMP/session_latest")" > "$STATE/ray-session"
for i in $(seq 1 "$WORKERS"); do start_node "worker$i" --address="127.0.0.1:$RAY_PORT"; done

# --- MLflow tracking server on PostgreSQL -------------------------------------------------------------
MLFLOW_BIN="$BIN/mlflow" MLFLOW_BACKEND_STORE_URI="$MLFLOW_STORE" MLFLOW_ARTIFACTS_DESTINATION="$STATE/mlartifacts" MLFLOW_PORT="$MLFLOW_PORT" \
  MLFLOW_HOST=127.0.0.1 MLFLOW_WORKERS=1 setsid nohup bash "$ROOT/mlflow/server.sh" >"$STATE/mlflow.log" 2>&1 < /dev/null &
echo $! > "$STATE/mlflow.pid"
for _ in $(seq 1 90); do
  if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$MLFLOW_PORT/health', timeout=2)" 2>/dev/null; then
    break
  fi
  kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null || { tail -20 "$STATE/mlflow.log" | mask >&2; die "the MLflow server exited (log: $STATE/mlflow.log)"; }
  sleep 1
done

cat > "$ENV_FILE" <<ENV
# Written by cluster/up.sh; removed by cluster/down.sh. Sourceable; the Makefile includes it.
RAY_ADDRESS=127.0.0.1:$RAY_PORT
RAY_AUTH_MODE=token
PRECISION_SEARCH_STORAGE=$STORAGE
MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
CLUSTER_RAY_PORT=$RAY_PORT
ENV
echo "cluster up: $NODES Ray nodes x $CPUS CPU (token auth), PostgreSQL and MLflow server"
sed -n '/^[A-Z]/p' "$ENV_FILE" | mask | sed 's/^/  /'
echo "  now: make search   (uses these while cluster/.env exists);  make cluster-down stops everything"
