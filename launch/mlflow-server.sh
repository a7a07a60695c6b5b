#!/usr/bin/env bash
# An MLflow tracking server for nin-train runs: metadata in a SQL store, artifacts (plots, config,
# the model) proxied by the server itself into ARTIFACTS, so clients need no access to that folder.
#
# Examples:
#   launch/mlflow-server.sh                                   # 127.0.0.1:5000, ./mlflow-server.db, ./mlartifacts
#   PORT=5001 ARTIFACTS=/data/mlartifacts launch/mlflow-server.sh
#   HOST=0.0.0.0 ALLOWED_HOSTS=head-node:5000 launch/mlflow-server.sh   # reachable from other nodes
#   PGPASSWORD=... BACKEND=postgresql+psycopg://mlflow@db:5432/mlflow WORKERS=8 launch/mlflow-server.sh
# A team's shared server keeps its store in PostgreSQL (several server workers and many writers at
# once; sqlite, the default, is for one machine). The driver is psycopg 3: pip install 'nin-dist[postgres]'.
# Its password goes in PGPASSWORD or ~/.pgpass, not in BACKEND: the server's command line is public (ps).
# then, on the training machines:
#   nin-train --config configs/cpu.yaml tracking.uri=http://HOST:PORT
#   (or export MLFLOW_TRACKING_URI=http://HOST:PORT)
# Runs that lost the server mid-run keep what they could not send in RUN_DIR/tracking-spool/;
# once the server is back: nin-train --sync-tracking RUN_DIR
#
# Extra arguments are passed to `mlflow server` unchanged (e.g. --dev).
set -euo pipefail

HOST=${HOST:-127.0.0.1}                           # interface to bind; 0.0.0.0 = every interface
PORT=${PORT:-5000}
BACKEND=${BACKEND:-sqlite:///mlflow-server.db}    # runs, params, metrics (SQLAlchemy URI: sqlite, postgresql+psycopg)
ARTIFACTS=${ARTIFACTS:-./mlartifacts}             # where the server stores uploaded artifacts
WORKERS=${WORKERS:-2}                             # server worker processes
# Host headers the server accepts (DNS-rebinding protection). MLflow's default is localhost and
# private addresses; set this to the name clients use when that name is public.
ALLOWED_HOSTS=${ALLOWED_HOSTS:-}

extra=()
if [[ -n "$ALLOWED_HOSTS" ]]; then
  extra+=(--allowed-hosts "$ALLOWED_HOSTS")
fi

exec mlflow server \
  --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --backend-store-uri "$BACKEND" \
  --serve-artifacts --artifacts-destination "$ARTIFACTS" \
  "${extra[@]}" "$@"
