#!/usr/bin/env bash
# Regenerates .sqlx (the offline data of the checked query! macros) after a query or a
# migration changed. Needs Postgres; uses a scratch database.
set -euo pipefail
cd "$(dirname "$0")/.."
admin="${AUTHSYNC_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
db="authsync_prepare_$$"
psql "$admin" -qc "CREATE DATABASE $db"
trap 'psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
url="${admin%/*}/$db"
for f in migrations/*.sql; do psql "$url" -q -v ON_ERROR_STOP=1 -f "$f"; done
rm -rf .sqlx && mkdir .sqlx
touch src/lib.rs $(grep -rl 'query\(_as\|_scalar\)\?!' src)
SQLX_OFFLINE=false DATABASE_URL="$url" SQLX_OFFLINE_DIR="$PWD/.sqlx" cargo check --all-targets
echo "sqlx-prepare: $(ls .sqlx | wc -l) queries in .sqlx"
