#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 and print its URL on stdout.
# Installs Debian's postgresql package when no server binaries are present.
set -euo pipefail
find_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$found" ] && [ -x "$found/initdb" ] && { echo "$found"; return; }
  command -v initdb >/dev/null 2>&1 && dirname "$(command -v initdb)"
}
bin=$(find_bin || true)
if [ -z "$bin" ]; then
  export DEBIAN_FRONTEND=noninteractive
  (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null) 1>&2
  bin=$(find_bin)
fi
id postgres >/dev/null 2>&1 || useradd --system --home /nonexistent postgres
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
data=$(mktemp -d /tmp/lamin-io-pg.XXXXXX)
chown postgres "$data"
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
as_pg "'$bin/initdb' -D '$data/db' -A trust -U postgres >/dev/null" 1>&2
as_pg "'$bin/pg_ctl' -D '$data/db' -l '$data/log' -w -o \"-p $port -k $data -c listen_addresses=127.0.0.1 -c fsync=off\" start >/dev/null" 1>&2
echo "postgresql://postgres@127.0.0.1:$port/postgres"
