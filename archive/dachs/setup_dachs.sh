#!/usr/bin/env bash
# archive/dachs/setup_dachs.sh -- install, configure and start GAVO DaCHS 2.7 (Debian bookworm)
# publishing the RPP ObsCore table rpp.main, for CI and for a local archive.
#
# Idempotent: safe to run again on a clean Debian 12 machine (as root) and on a machine where
# everything is already set up (then it only checks, ~5 s). What it does:
#   1. starts the PostgreSQL 15 cluster "main" if it is down;
#   2. installs postgresql-15-pgsphere, postgresql-15-q3c and gavodachs2-server (apt, no
#      recommends) unless present;
#   3. works around pgsphere 1.1.1 (bookworm) vs PostgreSQL >= 15.19: "CREATE EXTENSION pg_sphere"
#      fails with "commutator operator @> is already the commutator of operator <@" because of two
#      obsolete compatibility operators @(bigint|spoint, smoc) that upstream removed
#      (postgrespro/pgsphere#85, PR #92). The extension script is dpkg-diverted and the two
#      operators are dropped from the copy (DaCHS 2.7 does not use them);
#   4. finishes the DaCHS postinst (gavo database, dachs init) if needed;
#   5. sets the DaCHS web port (default 8089, NOT 8080: Airflow's api-server uses 8080) in
#      /etc/gavo.rc [web] serverPort/serverURL/bindAddress;
#   6. dachs imp //obscore; copies archive/dachs/q.rd to /var/gavo/inputs/rpp/q.rd and imports
#      it (table rpp.main, rows kept: updating data); re-imports metadata when the RD changed;
#   7. creates the least-privilege role rpp_pipeline: LOGIN, CONNECT on gavo, USAGE on schema
#      rpp, SELECT/INSERT/UPDATE on rpp.main only (no DELETE, no DDL, nothing on ivoa.*);
#   8. starts the DaCHS server (dachs serve start) and waits until it answers.
#
# Usage:  sudo archive/dachs/setup_dachs.sh          # set up and start
#         sudo archive/dachs/setup_dachs.sh stop     # stop the DaCHS server (by its pid file)
# Environment:
#   RPP_DACHS_PORT          web port (default 8089)
#   RPP_PIPELINE_PASSWORD   password of rpp_pipeline (default "rpp-pipeline-dev": CHANGE IT
#                           outside CI; the DSN printed at the end uses it)
#   RPP_DACHS_NO_INSTALL=1  never call apt-get (fail if packages are missing)
set -euo pipefail

PORT=${RPP_DACHS_PORT:-8089}
PIPE_PW=${RPP_PIPELINE_PASSWORD:-rpp-pipeline-dev}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RD_SRC="$HERE/q.rd"
RD_DIR=/var/gavo/inputs/rpp
PGVER=15
PIDFILE=/var/gavo/state/web.pid
T0=$SECONDS
say() { echo "[setup_dachs +$((SECONDS-T0))s] $*"; }
psql_gavo() { su postgres -c "psql -X -q -v ON_ERROR_STOP=1 -d gavo -Atc \"$1\""; }

if [ "$(id -u)" != 0 ]; then echo "setup_dachs.sh: must run as root" >&2; exit 2; fi

server_pid() {
  if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then cat "$PIDFILE"; fi
}

if [ "${1:-}" = stop ]; then
  pid=$(server_pid || true)
  if [ -n "$pid" ]; then
    kill "$pid"; for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    say "DaCHS server (pid $pid) stopped"
  else
    say "DaCHS server not running"
  fi
  exit 0
fi

# ------------------------------------------------------------------ 1. PostgreSQL
if ! pg_lsclusters -h 2>/dev/null | awk -v v=$PGVER '$1==v && $2=="main"{print $4}' | grep -q online; then
  say "starting PostgreSQL $PGVER/main"
  pg_ctlcluster --skip-systemctl-redirect $PGVER main start
fi

# ------------------------------------------------------------------ 2-4. packages
EXT=/usr/share/postgresql/$PGVER/extension/pg_sphere--1.2.0.sql
patch_pgsphere() {
  if [ -f "$EXT" ] && grep -q "backwards-compatible operators for GAVO DaCHS" "$EXT"; then
    say "pgsphere: dropping the obsolete @(bigint|spoint, smoc) operators (PG >= 15.19 rejects them)"
    if ! dpkg-divert --list "$EXT" | grep -q rpp-archive; then
      dpkg-divert --package rpp-archive --divert "$EXT.distrib" --rename --add "$EXT"
    fi
    sed '/backwards-compatible operators for GAVO DaCHS/,/^-- debugging/{/^-- debugging/!d}' \
      "$EXT.distrib" > "$EXT"
  fi
}
apt_install() {
  if [ "${RPP_DACHS_NO_INSTALL:-0}" = 1 ]; then
    echo "setup_dachs.sh: missing packages ($*) and RPP_DACHS_NO_INSTALL=1" >&2; exit 3
  fi
  [ -n "${_APT_UPDATED:-}" ] || { say "apt-get update"; apt-get update -qq; _APT_UPDATED=1; }
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    > /tmp/rpp_setup_dachs_apt.log 2>&1 || return 1
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in postgresql-$PGVER-pgsphere postgresql-$PGVER-q3c; do installed "$p" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}" || { tail -20 /tmp/rpp_setup_dachs_apt.log; exit 1; }
patch_pgsphere
if ! installed gavodachs2-server; then
  if ! apt_install gavodachs2-server; then
    # postinst failure (e.g. pgsphere was patched only now): patch and configure again
    patch_pgsphere
    DEBIAN_FRONTEND=noninteractive dpkg --configure -a || { tail -20 /tmp/rpp_setup_dachs_apt.log; exit 1; }
  fi
fi
dpkg --audit | grep -q gavodachs2-server && DEBIAN_FRONTEND=noninteractive dpkg --configure -a
say "$(dachs --version 2>&1 | head -1)"

if ! su postgres -c "psql -X -Atc \"select 1 from pg_database where datname='gavo'\"" | grep -q 1; then
  say "creating the gavo database and dachs init"
  su postgres -c "createdb --encoding=UTF-8 --template template0 gavo"
  su postgres -c "createuser -s dachsroot" 2>/dev/null || true
  mkdir -p /var/gavo && chown dachsroot /var/gavo
  su dachsroot -c "dachs init"
fi

# ------------------------------------------------------------------ 5. port
/usr/bin/python3 - "$PORT" <<'PY'
import configparser, sys
port = sys.argv[1]
path = "/etc/gavo.rc"
cfg = configparser.ConfigParser(interpolation=None)
cfg.optionxform = str
cfg.read(path)
if not cfg.has_section("web"):
    cfg.add_section("web")
want = {"serverPort": port, "serverURL": f"http://localhost:{port}", "bindAddress": "127.0.0.1"}
if any(cfg.get("web", k, fallback=None) != v for k, v in want.items()):
    for k, v in want.items():
        cfg.set("web", k, v)
    with open(path, "w") as f:
        cfg.write(f)
    print(f"[setup_dachs] /etc/gavo.rc: [web] serverPort={port}")
PY

# ------------------------------------------------------------------ 6. obscore + RD
if [ "$(psql_gavo "select to_regclass('ivoa._obscoresources') is not null")" != t ]; then
  say "dachs imp //obscore"
  su dachsroot -c "dachs imp //obscore" | tail -1
fi
mkdir -p "$RD_DIR"
rd_changed=0
if ! cmp -s "$RD_SRC" "$RD_DIR/q.rd"; then cp "$RD_SRC" "$RD_DIR/q.rd"; rd_changed=1; fi
chown -R dachsroot:gavo "$RD_DIR"
if [ "$(psql_gavo "select to_regclass('rpp.main') is not null")" != t ]; then
  say "dachs imp rpp/q (creates rpp.main)"
  su dachsroot -c "cd $RD_DIR && dachs imp q" | tail -1
elif [ $rd_changed = 1 ]; then
  say "RD changed: dachs imp -m rpp/q (metadata; rows kept)"
  su dachsroot -c "cd $RD_DIR && dachs imp -m q" | tail -1
fi
if [ "$(psql_gavo "select count(*) from ivoa._obscoresources where tablename='rpp.main'")" != 1 ]; then
  echo "setup_dachs.sh: rpp.main is not registered in ivoa._obscoresources" >&2; exit 1
fi

# ------------------------------------------------------------------ 7. role
say "role rpp_pipeline: SELECT, INSERT, UPDATE on rpp.main only"
if [ "$(psql_gavo "select count(*) from pg_roles where rolname='rpp_pipeline'")" = 0 ]; then
  psql_gavo "CREATE ROLE rpp_pipeline LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
fi
su postgres -c "psql -X -q -v ON_ERROR_STOP=1 -d gavo" <<SQL
ALTER ROLE rpp_pipeline LOGIN PASSWORD '${PIPE_PW//\'/\'\'}';
GRANT CONNECT ON DATABASE gavo TO rpp_pipeline;
GRANT USAGE ON SCHEMA rpp TO rpp_pipeline;
REVOKE ALL ON rpp.main FROM rpp_pipeline;
GRANT SELECT, INSERT, UPDATE ON rpp.main TO rpp_pipeline;
SQL

# ------------------------------------------------------------------ 8. server
answers() { curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$PORT/"; }
pid=$(server_pid || true)
if [ -n "$pid" ] && ! answers; then
  say "DaCHS running (pid $pid) but not on port $PORT: restarting"
  kill "$pid"; for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  pid=""
fi
if [ -z "$pid" ]; then
  say "dachs serve start"
  dachs serve start >/tmp/rpp_setup_dachs_serve.log 2>&1 || { cat /tmp/rpp_setup_dachs_serve.log; exit 1; }
fi
for _ in $(seq 1 60); do answers && break; sleep 0.5; done
answers || { echo "setup_dachs.sh: DaCHS does not answer on port $PORT" >&2; exit 1; }
say "ready: DaCHS pid $(server_pid) on http://localhost:$PORT"
cat <<EOF
  TAP:            http://localhost:$PORT/tap           (table rpp.main, view ivoa.obscore)
  SIAP2 sitewide: http://localhost:$PORT/__system__/siap2/sitewide/siap2.xml
  SIAP2 rpp:      http://localhost:$PORT/rpp/q/siap2/siap2.xml
  pipeline DSN:   postgresql://rpp_pipeline:<RPP_PIPELINE_PASSWORD>@127.0.0.1:5432/gavo
  stop:           $0 stop
EOF
