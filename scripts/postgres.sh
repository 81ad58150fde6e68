#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server (Debian's package) on 127.0.0.1 for the tests of the
# cluster-mode stores, and prints the URL. Idempotent: reuses a running server.
# Usage: eval "$(bash scripts/postgres.sh)"   -> exports XRDMATCH_TEST_PG_URL
set -uo pipefail
PORT=${XRDMATCH_PG_PORT:-54329}
DATA=${XRDMATCH_PG_DATA:-/tmp/xrdmatch-pg-$PORT}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$BIN" ]; then
  echo "echo 'PostgreSQL server not installed: PostgreSQL tests will be skipped' >&2"
  exit 0
fi
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if ! "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  if [ ! -s "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA"; [ "$(id -u)" = 0 ] && chown postgres: "$DATA"
    as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth=trust >/dev/null 2>&1
  fi
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c max_connections=200" start >/dev/null
fi
for db in xrdmatch_test mlflow_test; do
  as_pg "$BIN/psql" -q -h 127.0.0.1 -p "$PORT" -U postgres -tc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
    || as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$db"
done
echo "export XRDMATCH_TEST_PG_URL=postgresql://postgres@127.0.0.1:$PORT/xrdmatch_test"
echo "export XRDMATCH_TEST_PG_MLFLOW_URL=postgresql://postgres@127.0.0.1:$PORT/mlflow_test"
