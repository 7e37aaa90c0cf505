#!/usr/bin/env bash
# The test command: makes sure Postgres and a Kafka-protocol broker process are up, then
# runs the whole suite (unit + integration). Works on a fresh checkout of this machine.
#   ./scripts/test.sh            # everything
#   ./scripts/test.sh relay      # extra args go to cargo nextest (filters etc.)
set -euo pipefail
cd "$(dirname "$0")/.."

export AUTHSYNC_TEST_DATABASE_URL="${AUTHSYNC_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export PATH="$HOME/.cargo/bin:$PATH"

# --- Postgres -------------------------------------------------------------------------
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "test.sh: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432

# --- Kafka-protocol broker process (tansu) for the end-to-end test ----------------------
broker_pid=""
cleanup() { [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [ -z "${AUTHSYNC_TEST_KAFKA_BROKERS:-}" ]; then
  if command -v tansu >/dev/null 2>&1; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    tansu broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine memory://tansu/ >"${TMPDIR:-/tmp}/authsync-test-tansu.log" 2>&1 &
    broker_pid=$!
    for _ in $(seq 1 50); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    export AUTHSYNC_TEST_KAFKA_BROKERS="127.0.0.1:$port"
    echo "test.sh: tansu broker on $AUTHSYNC_TEST_KAFKA_BROKERS"
  else
    echo "test.sh: no broker process (install: cargo install tansu --version 0.6.0 --locked --features dynostore);"
    echo "         the real-broker end-to-end test will be skipped"
  fi
fi

# Compile queries against the committed .sqlx data, not whatever DATABASE_URL says.
export SQLX_OFFLINE=true
# `failpoints`: the crash-consistency test's deterministic crash points (compiled to nothing
# without it; never in a release build).
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --features failpoints --no-fail-fast "$@"
else
  cargo test --features failpoints -- "$@"
fi
