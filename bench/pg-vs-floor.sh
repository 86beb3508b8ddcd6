#!/usr/bin/env bash
# idem on PostgreSQL against the store's floor (pgbench running the store's own
# statements), back to back in one session: the ratios of docs/benchmarks.md,
# "PostgreSQL", without the whole kit.
#
#   bash bench/pg-vs-floor.sh IDEM_BIN [POOL] [SECONDS] [all|new|replay]
#
# Needs nginx, wrk, psql, pgbench, the PostgreSQL at 127.0.0.1:5432 and idem-floors
# built ($FLOORS_BIN or $CARGO_TARGET_DIR/release/idem-floors). Works in a database
# of its own ($PG_DB, default idem_pgfloor), created and dropped here. Prints idem's
# RESULT lines (with its CPU) and NEW/REPLAY idem=… floor=… ratio=….
set -uo pipefail
BIN=$(realpath "$1"); POOL=${2:-16}; DUR=${3:-8}; WHAT=${4:-all}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FLOORS=${FLOORS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/idem-floors}
P_UP=28081; P_IDEM=28090
DB=${PG_DB:-idem_pgfloor}
ADMIN="postgres://postgres@127.0.0.1:5432/postgres"
PG="postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable"
WORK=$(mktemp -d /tmp/idem-pgfloor.XXXXXX)
export IDEM_TENANT_SECRET="idem-bench-secret-0123456789abcdef" IDEM_LOG=warn
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    psql "$ADMIN" -qAtc "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=bench/nginx.sh
. "$ROOT/bench/nginx.sh"
nginx_conf 1 4096
"$(command -v nginx || echo /usr/sbin/nginx)" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
psql "$ADMIN" -qAtc "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1
psql "$ADMIN" -qAtc "CREATE DATABASE $DB" >/dev/null || exit 1
"$BIN" serve --upstream "http://127.0.0.1:$P_UP" --store "$PG&pool_size=$POOL" \
    --listen "127.0.0.1:$P_IDEM" >"$WORK/idem.log" 2>&1 &
IP=$!
PIDS+=("$IP")
URL="http://127.0.0.1:$P_IDEM/v1/charges"
for _ in $(seq 1 100); do curl -s -o /dev/null -X POST "$URL" && break; sleep 0.1; done
ticks() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }
wrkrun() { # scenario: prints req/s; the RESULT line (and idem's CPU) to stderr
    local t0 t1 out
    t0=$(ticks "$IP")
    out=$(SCENARIO=$1 RUN="r$RANDOM$RANDOM" wrk -t2 -c64 -d"${DUR}s" --timeout 5s -s "$ROOT/bench/load.lua" "$URL" 2>&1 | grep RESULT)
    t1=$(ticks "$IP")
    echo "$1 $out idem_cpu=$(( (t1 - t0) * 100 / $(getconf CLK_TCK) / DUR ))%" >&2
    sed -E 's/.*rps=([0-9.]+).*/\1/' <<<"$out"
}
pgb() { # clients script [pgbench options]: transactions per second
    local c=$1 s=$2
    shift 2
    pgbench -n -M prepared -c "$c" -j 2 -f "$s" "$@" "$PG" 2>&1 | sed -nE 's/^tps = ([0-9.]+).*/\1/p' | head -1
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
for s in new replay prefill; do "$FLOORS" pgbench "$s" >"$WORK/pg-$s.sql"; done
if [ "$WHAT" != replay ]; then
    inew=$(wrkrun new)
    fnew=$(pgb 16 "$WORK/pg-new.sql" -T "$DUR")
    echo "NEW idem=$inew floor=$fnew ratio=$(ratio "$inew" "$fnew")"
fi
if [ "$WHAT" != new ]; then
    SCENARIO=replay RUN=prefill wrk -t2 -c8 -d2s -s "$ROOT/bench/load.lua" "$URL" >/dev/null 2>&1
    irep=$(wrkrun replay)
    PGOPTIONS='-c synchronous_commit=off' pgb 1 "$WORK/pg-prefill.sql" -t 7000 >/dev/null
    frep=$(pgb 16 "$WORK/pg-replay.sql" -T "$DUR")
    echo "REPLAY idem=$irep floor=$frep ratio=$(ratio "$irep" "$frep")"
fi
