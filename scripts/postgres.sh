#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the shared Optuna study (tests, benchmarks, and a
# one-machine try of docs/scale_out.md). Debian's `postgresql` package, installed if missing.
#   scripts/postgres.sh start DATADIR PORT   -> prints the SQLAlchemy URL of database `memcontrol`
#   scripts/postgres.sh stop DATADIR
# Trust authentication on loopback only: never point a production study at this.
set -euo pipefail
cmd=${1:?usage: postgres.sh start|stop DATADIR [PORT]}
datadir=${2:?usage: postgres.sh start|stop DATADIR [PORT]}
port=${3:-55432}

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] && [ "$cmd" = start ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql >/dev/null
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

# PostgreSQL refuses to run as root: run it as the package's `postgres` user then.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
  start)
    mkdir -p "$datadir"
    datadir=$(cd "$datadir" && pwd)
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$datadir"
      # The `postgres` user must traverse the parents (a 0700 mktemp folder, say): x only, no listing.
      dir=$(dirname "$datadir")
      while [ "$dir" != / ]; do chmod o+x "$dir"; dir=$(dirname "$dir"); done
    fi
    if [ ! -f "$datadir/PG_VERSION" ]; then
      as_owner "$bindir/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    # 64 stale-free connections are enough for the 32-worker simulation plus MLflow.
    as_owner "$bindir/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w -o \
      "-c listen_addresses=127.0.0.1 -p $port -k $datadir -c max_connections=200 -c fsync=on" start >/dev/null
    as_owner "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='memcontrol'" | grep -q 1 \
      || as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres memcontrol
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/memcontrol"
    ;;
  stop)
    [ -f "$datadir/postmaster.pid" ] && as_owner "$bindir/pg_ctl" -D "$datadir" -m fast -w stop >/dev/null
    ;;
  *)
    echo "postgres.sh: unknown command '$cmd' (start|stop)" >&2
    exit 2
    ;;
esac
