#!/usr/bin/env bash
# Start the MLflow tracking server (UI + REST API + artifact proxy) for precision-search.
#
# Configuration, first found wins for each variable:
#   1. the environment;  2. mlflow/server.env (KEY=VALUE lines; copy server.env.example);  3. defaults below.
#
#   MLFLOW_HOST                   interface to bind                      (default 127.0.0.1: this machine only)
#   MLFLOW_PORT                   port                                   (default 5000)
#   MLFLOW_WORKERS                server worker processes                (default 2)
#   MLFLOW_BACKEND_STORE_URI      runs + registry database               (default sqlite:///<workdir>/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  where uploaded artifacts are stored    (default <workdir>/mlartifacts)
#                                 e.g. s3://bucket/prefix (+ MLFLOW_S3_ENDPOINT_URL for MinIO/Ceph/R2,
#                                 AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
#   MLFLOW_ALLOWED_HOSTS          Host headers accepted (needed when MLFLOW_HOST is not loopback)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (7 huey worker processes); precision-search
#                                 does not use it                        (default false)
#   PRECISION_SEARCH_WORKDIR      <workdir> above                        (default <repo>/.precision-search)
#   MLFLOW_BIN                    the mlflow executable                  (default <repo>/.venv/bin/mlflow)
#   MLFLOW_SERVER_ENV             the env file                           (default mlflow/server.env)
#
# Extra arguments are passed to `mlflow server` unchanged. `--print` prints the command instead of running it.
# Clients then use: export MLFLOW_TRACKING_URI=http://<host>:<port>
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

ENV_FILE="${MLFLOW_SERVER_ENV:-$HERE/server.env}"
if [[ -f "$ENV_FILE" ]]; then
  # KEY=VALUE lines; '#' comments; optional quotes. Values are taken literally (no shell expansion),
  # and a variable already set in the environment is not overridden.
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z "$line" || "$line" == \#* || "$line" != *=* ]] && continue
    key="${line%%=*}"; value="${line#*=}"
    key="${key%"${key##*[![:space:]]}"}"; key="${key#export }"
    if [[ ! "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
      echo "mlflow/server.sh: $ENV_FILE: bad line: $line" >&2; exit 2
    fi
    value="${value%\"}"; value="${value#\"}"; value="${value%\'}"; value="${value#\'}"
    if [[ -z "${!key+x}" ]]; then export "$key=$value"; fi
  done < "$ENV_FILE"
fi

WORKDIR="${PRECISION_SEARCH_WORKDIR:-$ROOT/.precision-search}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-2}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$WORKDIR/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$WORKDIR/mlartifacts}"
if [[ -n "${MLFLOW_BIN:-}" ]]; then MLFLOW="$MLFLOW_BIN"
elif [[ -x "$ROOT/.venv/bin/mlflow" ]]; then MLFLOW="$ROOT/.venv/bin/mlflow"
else MLFLOW="$(command -v mlflow || true)"; fi
if [[ -z "$MLFLOW" || ! -x "$MLFLOW" ]]; then
  echo "mlflow/server.sh: mlflow is not installed: run 'make venv' (or set MLFLOW_BIN)" >&2; exit 2
fi
PY="$(dirname "$MLFLOW")/python"; [[ -x "$PY" ]] || PY=python3

if [[ ! "$PORT" =~ ^[0-9]+$ ]]; then echo "mlflow/server.sh: MLFLOW_PORT must be a number, got '$PORT'" >&2; exit 2; fi

need() {  # need <python module> <what for> <pip package>
  if ! "$PY" -c "import $1" 2>/dev/null; then
    echo "mlflow/server.sh: $2 needs the Python package '$3': $(dirname "$MLFLOW")/pip install $3" >&2; exit 2
  fi
}
PRINT=0
PASS=()
for a in "$@"; do if [[ "$a" == "--print" ]]; then PRINT=1; else PASS+=("$a"); fi; done
mkdirp() { if [[ "$PRINT" == 0 ]]; then mkdir -p "$1"; fi; }

case "$BACKEND" in
  sqlite:///*) mkdirp "$(dirname "${BACKEND#sqlite:///}")" ;;
  postgres://*|postgresql://*|postgresql+psycopg://*|postgresql+psycopg2://*)
    # One driver for every spelling (as pipeline/urls.py does): psycopg 3, else psycopg2 if that is what is here.
    if "$PY" -c "import psycopg" 2>/dev/null; then BACKEND="postgresql+psycopg://${BACKEND#*://}"
    elif "$PY" -c "import psycopg2" 2>/dev/null; then BACKEND="postgresql+psycopg2://${BACKEND#*://}"
    else echo "mlflow/server.sh: MLFLOW_BACKEND_STORE_URI=postgresql://... needs a PostgreSQL driver:" \
              "$(dirname "$MLFLOW")/pip install -e '$ROOT[cluster]'  (psycopg 3)" >&2; exit 2; fi ;;
  mysql*) need pymysql "MLFLOW_BACKEND_STORE_URI=mysql+pymysql://..." pymysql ;;
  *) echo "mlflow/server.sh: MLFLOW_BACKEND_STORE_URI must be sqlite:///path, postgresql://... or mysql+pymysql://..., got '$BACKEND'" >&2; exit 2 ;;
esac
case "$ARTIFACTS" in
  s3://*) need boto3 "MLFLOW_ARTIFACTS_DESTINATION=s3://..." boto3 ;;
  gs://*) need google.cloud.storage "MLFLOW_ARTIFACTS_DESTINATION=gs://..." google-cloud-storage ;;
  *://*) ;;
  /*) mkdirp "$ARTIFACTS" ;;
  *) mkdirp "$ARTIFACTS"; ARTIFACTS="$(cd "$(dirname "$ARTIFACTS")" 2>/dev/null && pwd || echo "$PWD/$(dirname "$ARTIFACTS")")/$(basename "$ARTIFACTS")" ;;
esac

ARGS=(server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
      --host "$HOST" --port "$PORT" --workers "$WORKERS")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then ARGS+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"); fi
case "$HOST" in
  127.*|localhost|::1) ;;
  *) if [[ -z "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
       echo "mlflow/server.sh: warning: binding $HOST without MLFLOW_ALLOWED_HOSTS; MLflow then accepts only" \
            "localhost and private-IP Host headers. The server has no authentication: keep it on a trusted network." >&2
     fi ;;
esac

ARGS+=("${PASS[@]+"${PASS[@]}"}")

# Never echo credentials embedded in a database URL.
SHOWN_BACKEND="$(printf '%s' "$BACKEND" | sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#')"
if [[ "$PRINT" == 1 ]]; then
  printf '%q ' "$MLFLOW" "${ARGS[@]}" | sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#'; echo; exit 0
fi
echo "MLflow tracking server on http://$HOST:$PORT  (store: $SHOWN_BACKEND, artifacts: $ARTIFACTS)" >&2
echo "clients: export MLFLOW_TRACKING_URI=http://$HOST:$PORT" >&2
exec "$MLFLOW" "${ARGS[@]}"
