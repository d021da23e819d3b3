#!/usr/bin/env bash
# A PostgreSQL server on 127.0.0.1 for the storage tests (installed from Debian's packages
# when missing); prints the SQLAlchemy URL of a database the tests may use, in the plain
# postgresql:// form the README documents (psycopg 3, the `postgres` extra's driver).
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_lsclusters -h | grep -q "^$ver main" || pg_createcluster "$ver" main >&2
pg_ctlcluster "$ver" main start >&2 2>/dev/null || true  # already running is fine
port=$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" {print $3}')
psql() { su postgres -c "psql -p $port -qAt -c \"$1\""; }
for _ in $(seq 30); do psql "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
[ "$(psql "SELECT 1 FROM pg_roles WHERE rolname = 'mergesearch'")" = 1 ] \
  || psql "CREATE ROLE mergesearch LOGIN PASSWORD 'mergesearch'" >&2
[ "$(psql "SELECT 1 FROM pg_database WHERE datname = 'mergesearch_test'")" = 1 ] \
  || psql "CREATE DATABASE mergesearch_test OWNER mergesearch" >&2
echo "postgresql://mergesearch:mergesearch@127.0.0.1:$port/mergesearch_test"
