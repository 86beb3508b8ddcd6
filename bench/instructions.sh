#!/usr/bin/env bash
# Instructions per request of idem (or of the floor proxy), counted by callgrind while
# wrk drives one scenario: repeatable on a shared, noisy machine, where timings are
# not. The whole process is counted (hyper, tokio, idem, libc), with one worker.
#
#   bash bench/instructions.sh BIN SCENARIO [SECONDS]
#     BIN       an idem binary (e.g. target/release/idem), or idem-floor
#     SCENARIO  pass | new | replay | storm (bench/load.lua's)
#
# CALLGRIND_OUT=FILE keeps the profile (callgrind_annotate --inclusive=yes FILE).
# STORE=URL runs idem on that store instead of `memory` (e.g. `sqlite:` for a file in
# the run's temp dir, or a redis:// or postgres:// URL of a server you started).
# Prints: <bin> <scenario> requests=N Ir/request=M. callgrind runs the code ~50× slower,
# so a few seconds give a few thousand requests. Its SHA-256 is the portable code, not
# the SHA-NI path a real CPU takes. Needs valgrind, wrk, nginx; everything it starts it
# stops; traffic stays on 127.0.0.1.
set -euo pipefail
BIN=$(realpath "$1")
SCEN=$2
DUR=${3:-4}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOAD="$ROOT/bench/load.lua"
P_UP=18181
P_UNDER=18190
WORK=$(mktemp -d /tmp/idem-instructions.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=bench/nginx.sh
. "$ROOT/bench/nginx.sh"
nginx_conf 1 1024
"$(command -v nginx || echo /usr/sbin/nginx)" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

# One worker where the binary has workers (builds before them have one runtime).
printf '[proxy]\nworkers = 1\n' >"$WORK/idem.toml"
if [ "$(basename "$BIN")" != idem-floor ] && ! "$BIN" check-config "$WORK/idem.toml" >/dev/null 2>&1; then
    : >"$WORK/idem.toml"
fi
if [ "$(basename "$BIN")" = idem-floor ]; then
    args=("127.0.0.1:$P_UNDER" "http://127.0.0.1:$P_UP" proxy per-core)
else
    store=${STORE:-memory}
    [ "$store" = sqlite: ] && store="sqlite:$WORK/idem.db"
    args=(serve --config "$WORK/idem.toml" --upstream "http://127.0.0.1:$P_UP" --store "$store"
        --listen "127.0.0.1:$P_UNDER")
fi
IDEM_TENANT_SECRET="idem-bench-secret-0123456789abcdef" IDEM_LOG=warn \
    valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" --instr-atstart=no \
    "$BIN" "${args[@]}" >"$WORK/valgrind.log" 2>&1 &
P=$!
PIDS+=("$P")
URL="http://127.0.0.1:$P_UNDER/v1/charges"
for _ in $(seq 1 150); do curl -s -o /dev/null -X POST "$URL" && break; sleep 0.2; done
drive() { # scenario seconds run-id: one wrk run, prints its RESULT line
    SCENARIO=$1 RUN=$3 CONNS=4 wrk -t1 -c4 -d"$2"s -s "$LOAD" "$URL" 2>&1 | grep '^RESULT' || true
}
[ "$SCEN" = replay ] && drive replay 3 prefill >/dev/null
drive "$SCEN" 2 "warm-$RANDOM" >/dev/null
callgrind_control -i on "$P" >/dev/null 2>&1
out=$(drive "$SCEN" "$DUR" "count-$RANDOM")
callgrind_control -i off "$P" >/dev/null 2>&1
kill "$P"
wait "$P" 2>/dev/null || true
n=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$out")
ir=$(awk '/Collected :/ {print $NF}' "$WORK/valgrind.log")
# CALLGRIND_OUT=FILE keeps the profile, for callgrind_annotate.
[ -n "${CALLGRIND_OUT:-}" ] && cp "$WORK/callgrind.out" "$CALLGRIND_OUT"
echo "$(basename "$BIN") $SCEN requests=$n Ir/request=$(( ir / n ))"
