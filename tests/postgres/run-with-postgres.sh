#!/usr/bin/env bash
# Run a command (the test suite) with a throwaway PostgreSQL server on loopback.
#
#   tests/postgres/run-with-postgres.sh .venv/bin/pytest -q
#
# Installs the Debian `postgresql` package if no server binaries are found (CI runs as root
# on Debian), initialises a cluster in a temporary directory, starts it on a free loopback
# port as an unprivileged user, exports TORPOR_TEST_POSTGRES_URL for the command, and stops
# and removes the server afterwards. If the server cannot be started, this fails loudly:
# the store's PostgreSQL tests are never skipped silently.
#
# If TORPOR_TEST_POSTGRES_URL is already set, that server is used and none is started.
set -euo pipefail

say() { echo "[postgres] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[[ $# -gt 0 ]] || die "usage: $0 COMMAND [ARGS...]"

if [[ -n "${TORPOR_TEST_POSTGRES_URL:-}" ]]; then
  say "using the server of TORPOR_TEST_POSTGRES_URL"
  exec "$@"
fi

find_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then echo "$dir"; return 0; fi
  done
  return 1
}

BINDIR="$(find_bindir || true)"
if [[ -z "$BINDIR" ]]; then
  [[ "$(id -u)" == 0 ]] || die "no PostgreSQL server found under /usr/lib/postgresql and not root: install the 'postgresql' package"
  command -v apt-get >/dev/null || die "no PostgreSQL server found and no apt-get to install one"
  say "installing the postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends postgresql >&2 || die "apt-get install postgresql failed"
  BINDIR="$(find_bindir)" || die "postgresql installed but no initdb/pg_ctl found"
fi

# PostgreSQL refuses to run as root: run it as an unprivileged user.
RUN=()
if [[ "$(id -u)" == 0 ]]; then
  PGUSER_OS=nobody
  id "$PGUSER_OS" >/dev/null 2>&1 || die "user $PGUSER_OS does not exist"
  RUN=(runuser -u "$PGUSER_OS" --)
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/torpor-pg.XXXXXX")"
chmod 0755 "$WORK"
[[ ${#RUN[@]} -eq 0 ]] || chown "$PGUSER_OS" "$WORK"
DATA="$WORK/data"
LOG="$WORK/server.log"

stop_server() {
  if [[ -f "$DATA/postmaster.pid" ]]; then
    "${RUN[@]}" "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || say "pg_ctl stop failed"
  fi
  rm -rf "$WORK"
}
trap stop_server EXIT

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

say "initdb in $WORK ($BINDIR)"
"${RUN[@]}" "$BINDIR/initdb" -D "$DATA" -U torpor --auth=trust --encoding=UTF8 --no-sync \
  >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }

# fsync off: a throwaway test server; crash-safety of the catalog is SQLite's and the
# protocol's business, not this server's.
OPTS="-c listen_addresses=127.0.0.1 -p $PORT -k $WORK -c fsync=off -c synchronous_commit=off"
OPTS="$OPTS -c full_page_writes=off -c max_connections=200"
if ! "${RUN[@]}" "$BINDIR/pg_ctl" -D "$DATA" -l "$LOG" -o "$OPTS" -w -t 60 start >/dev/null; then
  cat "$LOG" >&2 || true
  die "PostgreSQL did not start"
fi
"$BINDIR/pg_isready" -h 127.0.0.1 -p "$PORT" -t 30 >/dev/null || { cat "$LOG" >&2; die "PostgreSQL is not ready"; }

export TORPOR_TEST_POSTGRES_URL="postgresql+psycopg://torpor@127.0.0.1:$PORT/postgres"
say "PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT"

set +e
"$@"
status=$?
set -e
exit "$status"
