#!/usr/bin/env bash
# idem's benchmark kit: idem (each store) against the direct upstream, nginx as a plain
# keep-alive reverse proxy (the yardstick), and a Node peer (@node-idempotency/core on
# Redis), all measured in one run on 127.0.0.1 so that machine drift cancels out in the
# ratios. Results: bench/results/<mode>.tsv (raw), bench/results/<mode>.md (tables),
# bench/results/<mode>.png (plot, full mode). docs/benchmarks.md explains them.
#
#   bash bench/run.sh            full run (~15 min on 2 cores; --fill sets the records
#                                 pre-filled for the cost-growth runs, default 5000000)
#   bash bench/run.sh --smoke    seconds per step, small fill, no thresholds: keeps the
#                                 kit from rotting (.ci/run calls it)
#   options: --duration S  --fill N  --profile STORE:SCENARIO (perf + flamegraph SVG)
#   environment: IDEM_BIN=path skips the build and measures that binary
#
# Everything it starts it stops (trap EXIT); every loop is bounded; traffic goes to
# 127.0.0.1 only. Redis runs as a private redis-server on a spare port (flushed freely);
# PostgreSQL is the one at 127.0.0.1:5432, in a database of its own (idem_bench) that
# is dropped at exit, so the 5M-row fill never touches other users' `test` database.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/nginx.sh
. "$ROOT/bench/nginx.sh"
BENCH="$ROOT/bench"
MODE=full
DUR=10
LAT_DUR=10
FILL=5000000
PROFILE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) MODE=smoke; DUR=1; LAT_DUR=1; FILL=20000 ;;
        --duration) DUR="$2"; LAT_DUR="$2"; shift ;;
        --fill) FILL="$2"; shift ;;
        --profile) PROFILE="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

CONNS=64          # saturation: wrk -t2 -c64
LAT_CONNS=32      # fixed-rate latency runs
P_UP=18081        # upstream (nginx `return 201`)
P_UPS=18083       # the same upstream over TLS (https, HTTP/1.1)
P_NGINX=18082     # nginx reverse proxy to the upstream
P_IDEM=18090      # idem (one store at a time)
P_PEER=18095      # node peer
P_FLOOR=18096     # the floor proxy (bench/floor-proxy)
P_PAY=18097       # the payments example (Tower layer)
FLOOR_MODEL=per-core # the floor's serving model that matches idem's default
P_REDIS=16391     # private redis-server
PG_ADMIN_URL="postgres://postgres@127.0.0.1:5432/test"
PG_DB=idem_bench
# Plain TCP on loopback, as in the earlier runs: libpq's default (sslmode=prefer)
# would encrypt, since the machine's server has ssl = on.
PG_URL="postgres://postgres@127.0.0.1:5432/$PG_DB?sslmode=disable"
export IDEM_TENANT_SECRET="idem-bench-secret-0123456789abcdef"
export IDEM_LOG=warn

WORK=$(mktemp -d /tmp/idem-bench.XXXXXX)
mkdir -p "$BENCH/results"
TSV="$BENCH/results/$MODE.tsv"
RUNID="r$(date +%s)"
TICK=$(getconf CLK_TCK)
PIDS=()
PG_CREATED=0

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
loud() { printf '\n########## %s ##########\n\n' "$*" >&2; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ "$PG_CREATED" = 1 ]; then
        psql "$PG_ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS $PG_DB" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

forget_pid() { # removes $1 from PIDS once stopped
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
stop_pid() {
    local pid="$1"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}
wait_http() { # url, seconds: until anything answers
    local i
    for i in $(seq 1 $(( $2 * 10 ))); do
        curl -s -o /dev/null -m 1 -X POST "$1" && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- install
need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

HAVE_REDIS=0; command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && HAVE_REDIS=1
HAVE_PG=0
if command -v psql >/dev/null 2>&1 && psql "$PG_ADMIN_URL" -qAtc 'SELECT 1' >/dev/null 2>&1; then HAVE_PG=1; fi
[ "$HAVE_REDIS" = 1 ] || loud "SKIPPED: redis-server not installed: no redis store, no node peer"
[ "$HAVE_PG" = 1 ] || loud "SKIPPED: no PostgreSQL at 127.0.0.1:5432: no postgres store"

HAVE_PEER=0
if [ "$HAVE_REDIS" = 1 ] && command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    if [ -d "$BENCH/peer/node_modules/@node-idempotency/core" ] ||
        (cd "$BENCH/peer" && timeout 180 npm ci --no-audit --no-fund --loglevel=error >/dev/null 2>&1); then
        HAVE_PEER=1
    fi
fi
if [ "$HAVE_PEER" = 0 ]; then
    loud "SKIPPED: node peer (@node-idempotency/core) unavailable: node/npm/redis missing or npm ci failed"
    [ "$MODE" = full ] && log "WARNING: the full table will have no peer column"
fi

# Smoke mode takes the debug build the tests already made (seconds, not minutes):
# its figures mean nothing, it only proves that every step still works.
# The floor proxy is always a release build: its figures are the yardstick of idem's own
# cost, and it builds in seconds once the workspace's dependencies are built.
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
built() { # package binary: builds it (debug in smoke mode, else release), prints its path
    local profile=release flag=--release
    [ "$MODE" = smoke ] && { profile=debug; flag=; }
    log "building $1 ($profile)"
    (cd "$ROOT" && cargo build $flag -q -p "$1") >&2
    echo "$TARGET_DIR/$profile/$2"
}
IDEM="${IDEM_BIN:-}"   # a binary built elsewhere (e.g. before/after figures of a change)
[ -n "$IDEM" ] || IDEM=$(built idem-proxy idem)
PAYMENTS=$(built payments payments)   # the Tower layer's cost
if [ -n "${FLOOR_BIN:-}" ]; then
    FLOOR="$FLOOR_BIN"
else
    log "building the floor proxy (release)"
    (cd "$ROOT" && cargo build --release -q -p idem-bench-floor)
    FLOOR="$TARGET_DIR/release/idem-floor"
fi

if [ -n "$PROFILE" ] && ! command -v inferno-collapse-perf >/dev/null 2>&1; then
    log "installing inferno (flamegraphs) for --profile"
    cargo install inferno --locked -q || log "WARNING: no inferno: perf script text only"
fi
if [ -n "$PROFILE" ] && ! command -v perf >/dev/null 2>&1; then
    apt-get install -y -qq linux-perf >/dev/null 2>&1 || log "WARNING: no perf: --profile ignored"
fi

# ---------------------------------------------------------------- servers
# A private CA and a certificate for 127.0.0.1, for the https upstream.
mkdir -p "$WORK/tls"
HAVE_TLS=0
if command -v openssl >/dev/null 2>&1 && (
    cd "$WORK/tls" &&
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=idem bench CA" -keyout ca.key -out ca.crt &&
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
        -keyout up.key -out up.csr &&
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >up.ext &&
    openssl x509 -req -in up.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile up.ext -out up.crt
) >/dev/null 2>&1; then
    HAVE_TLS=1
else
    loud "SKIPPED: no openssl to make a certificate: no https upstream run"
fi
TLS_SERVER=""
if [ "$HAVE_TLS" = 1 ]; then
    # The upstream over TLS: HTTP/1.1 as the plain one, so that the ratio is TLS's cost.
    TLS_SERVER="server {
        listen 127.0.0.1:$P_UPS ssl;
        ssl_certificate $WORK/tls/up.crt;
        ssl_certificate_key $WORK/tls/up.key;
        location / {
            $NGINX_CHARGE
        }
    }"
fi
nginx_conf auto 4096 "$TLS_SERVER
    upstream api { server 127.0.0.1:$P_UP; keepalive 128; keepalive_requests 100000000; }
    # The yardstick: a plain keep-alive reverse proxy.
    server {
        listen 127.0.0.1:$P_NGINX;
        location / {
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }
"
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
wait_http "http://127.0.0.1:$P_UP/v1/charges" 10 || { echo "nginx did not start" >&2; cat "$WORK/nginx/error.log" >&2; exit 1; }
wait_http "http://127.0.0.1:$P_NGINX/v1/charges" 10

if [ "$HAVE_REDIS" = 1 ]; then
    redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    PIDS+=($!)
    for _ in $(seq 1 50); do redis-cli -p "$P_REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
rcli() { redis-cli -h 127.0.0.1 -p "$P_REDIS" "$@"; }
if [ "$HAVE_PG" = 1 ]; then
    psql "$PG_ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS $PG_DB" >/dev/null
    psql "$PG_ADMIN_URL" -qAtc "CREATE DATABASE $PG_DB" >/dev/null
    PG_CREATED=1
fi

STORES=(memory sqlite)
[ "$HAVE_REDIS" = 1 ] && STORES+=(redis)
[ "$HAVE_PG" = 1 ] && STORES+=(postgres)

store_url() {
    case "$1" in
        memory) echo memory ;;
        sqlite) echo "sqlite:$WORK/idem.db" ;;
        redis) echo "redis://127.0.0.1:$P_REDIS/0" ;;
        postgres) echo "$PG_URL" ;;
    esac
}
reset_store() { # an empty store
    case "$1" in
        sqlite) rm -f "$WORK"/idem.db* ;;
        redis) rcli -n 0 FLUSHDB >/dev/null ;;
        postgres) psql "$PG_URL" -qAtc "DROP SCHEMA public CASCADE; CREATE SCHEMA public" >/dev/null 2>&1 ;;
    esac
}
IDEM_PID=""
start_idem() { # store [extra idem arguments]; the upstream is $IDEM_UPSTREAM if set
    local store="$1"
    shift
    "$IDEM" serve --upstream "${IDEM_UPSTREAM:-http://127.0.0.1:$P_UP}" --store "$(store_url "$store")" \
        --listen "127.0.0.1:$P_IDEM" "$@" >"$WORK/idem-$store.log" 2>&1 &
    IDEM_PID=$!
    PIDS+=("$IDEM_PID")
    wait_http "http://127.0.0.1:$P_IDEM/v1/charges" 30 || { cat "$WORK/idem-$store.log" >&2; exit 1; }
}
stop_idem() { [ -n "$IDEM_PID" ] && stop_pid "$IDEM_PID"; IDEM_PID=""; }

cpu_ticks() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat" 2>/dev/null || echo 0; }
status_kb() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

printf 'target\tstore\tscenario\tkind\tconns\trate\trps\tp50_us\tp99_us\tp999_us\tnon2xx\terrors\tcpu_pct\thwm_kb\n' >"$TSV"

# wrk_run TARGET STORE SCENARIO KIND URL [RATE] [PID]: one wrk run, one TSV row.
LAST_RPS=0
wrk_run() {
    local target="$1" store="$2" scen="$3" kind="$4" url="$5" rate="${6:-}" pid="${7:-}"
    local conns=$CONNS dur=$DUR
    if [ -n "$rate" ]; then conns=$LAT_CONNS; dur=$LAT_DUR; fi
    local t0=0 t1=0 cpu="" hwm="" out line
    [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
    out=$(SCENARIO="$scen" RUN="$RUNID-$target-$store-$kind" RATE="$rate" CONNS="$conns" \
        timeout $(( dur + 30 )) wrk -t2 -c"$conns" -d"${dur}s" --timeout 5s -s "$BENCH/load.lua" "$url/v1/charges" 2>&1) || true
    line=$(grep '^RESULT' <<<"$out" || true)
    if [ -z "$line" ]; then echo "$out" >&2; echo "wrk gave no result for $target/$store/$scen" >&2; return 1; fi
    if [ -n "$pid" ]; then
        t1=$(cpu_ticks "$pid")
        cpu=$(awk -v a="$t0" -v b="$t1" -v t="$TICK" -v d="$dur" 'BEGIN{printf "%.0f", (b-a)/t/d*100}')
        hwm=$(status_kb "$pid" VmHWM)
    fi
    local rps p50 p99 p999 non2xx errs
    rps=$(sed -E 's/.*rps=([0-9.]+).*/\1/' <<<"$line")
    p50=$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$line")
    p99=$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$line")
    p999=$(sed -E 's/.*p999_us=([0-9]+).*/\1/' <<<"$line")
    non2xx=$(sed -E 's/.*non2xx=([0-9]+).*/\1/' <<<"$line")
    errs=$(sed -E 's/.*sock_errors=([0-9]+).*/\1/' <<<"$line")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$store" "$scen" "$kind" \
        "$conns" "${rate:--}" "$rps" "$p50" "$p99" "$p999" "$non2xx" "$errs" "${cpu:--}" "${hwm:--}" >>"$TSV"
    log "$target/$store/$scen/$kind: ${rps} req/s p50=${p50}us p99=${p99}us p99.9=${p999}us non2xx=$non2xx cpu=${cpu:--}%"
    LAST_RPS=$rps
}

replay_ok() { # one stored key answers as a replay
    curl -s -D - -o /dev/null -X POST "$1/v1/charges" -H 'Content-Type: application/json' \
        -H 'Authorization: Bearer sk_bench_tenant' -H 'Idempotency-Key: replay-7' \
        -d '{"amount":1500,"currency":"brl","customer":"cus_bench"}' | grep -qi '^idempotent-replayed: true'
}
prepopulate() { # cycles over the 1,000 replay keys until all are stored
    SCENARIO=replay RUN=prefill CONNS=8 timeout 60 wrk -t2 -c8 -d2s -s "$BENCH/load.lua" "$1/v1/charges" >/dev/null 2>&1 || true
    replay_ok "$1" || { echo "replay keys were not stored at $1" >&2; return 1; }
}

# ---------------------------------------------------------------- yardsticks
loud "yardsticks: direct upstream and nginx ($MODE, ${DUR}s per run)"
UP="http://127.0.0.1:$P_UP"
NG="http://127.0.0.1:$P_NGINX"
wrk_run direct - pass sat "$UP"
wrk_run nginx - pass sat "$NG"
NGINX_RPS=$LAST_RPS
RATE=$(awk -v r="$NGINX_RPS" 'BEGIN{printf "%d", r/2}')
log "fixed rate for latency runs: $RATE req/s (half nginx's saturation)"
wrk_run direct - pass lat "$UP" "$RATE"
wrk_run nginx - pass lat "$NG" "$RATE"

# ---------------------------------------------------------------- floor
# The floor: a proxy made of idem's own crates doing nothing else (bench/floor-proxy), in each
# serving model; `answer` mode answers from memory, the floor of a replay. idem's cost is
# its figure over the floor's in the same serving model.
FL="http://127.0.0.1:$P_FLOOR"
start_floor() { # mode model [protocol]
    "$FLOOR" "127.0.0.1:$P_FLOOR" "$UP" "$1" "$2" "${3:-http1}" >"$WORK/floor.log" 2>&1 &
    FLOOR_PID=$!
    PIDS+=("$FLOOR_PID")
    wait_http "$FL/v1/charges" 10 || { cat "$WORK/floor.log" >&2; exit 1; }
}
for model in shared per-core; do
    loud "floor proxy ($model)"
    start_floor proxy "$model"
    wrk_run floor "$model" pass sat "$FL" "" "$FLOOR_PID"
    [ "$model" = "$FLOOR_MODEL" ] && wrk_run floor "$model" pass lat "$FL" "$RATE" "$FLOOR_PID"
    stop_pid "$FLOOR_PID"
    start_floor answer "$model"
    wrk_run floor "$model" replay sat "$FL" "" "$FLOOR_PID"
    stop_pid "$FLOOR_PID"
done
# What detecting h2c on each connection costs (idem serves HTTP/1.1 and h2c).
start_floor proxy "$FLOOR_MODEL" auto
wrk_run floor "$FLOOR_MODEL-auto" pass sat "$FL" "" "$FLOOR_PID"
stop_pid "$FLOOR_PID"

# ---------------------------------------------------------------- idem
IDEM_URL="http://127.0.0.1:$P_IDEM"
for store in "${STORES[@]}"; do
    loud "idem on $store"
    reset_store "$store"
    start_idem "$store"
    for scen in pass new replay storm; do
        [ "$scen" = replay ] && prepopulate "$IDEM_URL"
        wrk_run idem "$store" "$scen" sat "$IDEM_URL" "" "$IDEM_PID"
        [ "$scen" = storm ] || wrk_run idem "$store" "$scen" lat "$IDEM_URL" "$RATE" "$IDEM_PID"
    done
    if [ -n "$PROFILE" ] && [ "${PROFILE%%:*}" = "$store" ] && command -v perf >/dev/null 2>&1; then
        pscen="${PROFILE#*:}"
        log "profiling idem/$store/$pscen with perf"
        perf record -F 499 --call-graph dwarf,16384 -o "$WORK/perf.data" -p "$IDEM_PID" -- sleep "$DUR" >/dev/null 2>&1 &
        perf_pid=$!
        wrk_run idem "$store" "$pscen" profiled "$IDEM_URL" "" "$IDEM_PID"
        wait "$perf_pid" || true
        perf script -i "$WORK/perf.data" 2>/dev/null >"$BENCH/results/perf-$store-$pscen.txt" || true
        if command -v inferno-collapse-perf >/dev/null 2>&1; then
            inferno-collapse-perf <"$BENCH/results/perf-$store-$pscen.txt" >"$BENCH/results/perf-$store-$pscen.folded"
            inferno-flamegraph --title "idem $store $pscen" <"$BENCH/results/perf-$store-$pscen.folded" \
                >"$BENCH/results/flamegraph-$store-$pscen.svg"
        fi
    fi
    stop_idem
done

# ---------------------------------------------------------------- tower layer
# What the layer costs an axum service: the payments example without the layer, then
# with it (memory store, keys optional so that a request without one passes through).
loud "Tower layer: the payments example without and with it (memory store)"
PAY="http://127.0.0.1:$P_PAY"
for mode in plain layer; do
    if [ "$mode" = plain ]; then pay_args=(--plain); else pay_args=(--memory --optional-keys); fi
    RUST_LOG=warn "$PAYMENTS" --listen "127.0.0.1:$P_PAY" "${pay_args[@]}" >"$WORK/payments.log" 2>&1 &
    PAY_PID=$!
    PIDS+=("$PAY_PID")
    wait_http "$PAY/v1/charges" 30 || { cat "$WORK/payments.log" >&2; exit 1; }
    for scen in pass new; do
        wrk_run layer "$mode" "$scen" sat "$PAY" "" "$PAY_PID"
    done
    stop_pid "$PAY_PID"
done

# ---------------------------------------------------------------- upstream over TLS
if [ "$HAVE_TLS" = 1 ]; then
    loud "new key through an https upstream vs plain http (memory store, alternated)"
    printf 'upstream = "https://127.0.0.1:%s"\n[upstream_tls]\nca = "%s"\n' "$P_UPS" "$WORK/tls/ca.crt" \
        >"$WORK/idem-https.toml"
    for _ in 1 2; do
        start_idem memory
        wrk_run idem memory new up-http "$IDEM_URL" "" "$IDEM_PID"
        stop_idem
        IDEM_UPSTREAM="https://127.0.0.1:$P_UPS" start_idem memory --config "$WORK/idem-https.toml"
        wrk_run idem memory new up-https "$IDEM_URL" "" "$IDEM_PID"
        stop_idem
    done
fi

# nginx again: the mean of before and after is the yardstick, so slow drift cancels
wrk_run nginx - pass sat "$NG"

# ---------------------------------------------------------------- peer
if [ "$HAVE_PEER" = 1 ]; then
    loud "peer: @node-idempotency/core + Redis (node, $(nproc) workers)"
    rcli -n 1 FLUSHDB >/dev/null
    PORT=$P_PEER UPSTREAM="$UP" REDIS_URL="redis://127.0.0.1:$P_REDIS/1" node "$BENCH/peer/server.js" \
        >"$WORK/peer.log" 2>&1 &
    PEER_PID=$!
    PIDS+=("$PEER_PID")
    PEER="http://127.0.0.1:$P_PEER"
    if wait_http "$PEER/v1/charges" 30; then
        for scen in pass new replay storm; do
            [ "$scen" = replay ] && { prepopulate "$PEER" || true; }
            wrk_run peer node-redis "$scen" sat "$PEER"
            [ "$scen" = new ] && wrk_run peer node-redis "$scen" lat "$PEER" "$RATE"
        done
    else
        loud "SKIPPED: node peer did not start"; cat "$WORK/peer.log" >&2
    fi
    stop_pid "$PEER_PID"
fi

# ---- store floors
# Each durable store's own statements without idem around them (bench/floors): SQLite's
# claim and complete in batched transactions with the same `synchronous`, then its read
# on one read-only connection per core; Redis's scripts on one multiplexed connection
# with the kit's $CONNS callers; PostgreSQL's statements under pgbench with as many
# clients as idem's pool. Rows: target=floor, kind=sat, rps = claim+complete pairs/s
# (new) or reads/s (replay). report.py sets idem against them.
PG_POOL=16        # idem's default PostgreSQL pool (PostgresOptions::max_connections)
FLOORS="${FLOORS_BIN:-}"
[ -n "$FLOORS" ] || FLOORS=$(built idem-floors idem-floors)
floor_row() { # store scenario conns rate
    printf 'floor\t%s\t%s\tsat\t%s\t-\t%s\t-\t-\t-\t-\t-\t-\t-\n' "$1" "$2" "$3" "$4" >>"$TSV"
    log "floor/$1/$2: $4 ops/s"
}
floors_run() { # store conns command...: one row per FLOOR line it prints
    local store="$1" conns="$2" out line
    shift 2
    if ! out=$(timeout $(( 2 * DUR + 120 )) "$@" 2>&1); then
        echo "$out" >&2
        loud "floor of $store failed: no floor row"
        return 0
    fi
    while read -r line; do
        floor_row "$store" "$(sed -E 's/.*scenario=([a-z]+).*/\1/' <<<"$line")" "$conns" \
            "$(sed -E 's/.*rate=([0-9.]+).*/\1/' <<<"$line")"
    done < <(grep '^FLOOR' <<<"$out")
}
pgbench_tps() { # clients, script, then pgbench options: transactions (script runs) per s
    local clients="$1" script="$2" out
    shift 2
    out=$(timeout $(( DUR + 120 )) pgbench -n -M prepared -c "$clients" -j $(( clients < 2 ? clients : 2 )) -f "$script" "$@" "$PG_URL" 2>&1) ||
        { echo "$out" >&2; return 1; }
    sed -nE 's/^tps = ([0-9.]+).*/\1/p' <<<"$out" | head -1
}
loud "store floors: each store's own statements, without idem"
rm -f "$WORK"/floor.db*
floors_run sqlite 1 "$FLOORS" sqlite "$WORK/floor.db" full "$DUR"
rm -f "$WORK"/floor.db*
if [ "$HAVE_REDIS" = 1 ]; then
    rcli -n 2 FLUSHDB >/dev/null
    floors_run redis "$CONNS" "$FLOORS" redis "redis://127.0.0.1:$P_REDIS/2" "$CONNS" "$DUR"
    rcli -n 2 FLUSHDB >/dev/null
fi
if [ "$HAVE_PG" = 1 ] && command -v pgbench >/dev/null 2>&1; then
    reset_store postgres
    start_idem postgres; stop_idem   # the schema, by idem's own migration
    for scen in new replay prefill; do "$FLOORS" pgbench "$scen" >"$WORK/pg-$scen.sql"; done
    if tps=$(pgbench_tps "$PG_POOL" "$WORK/pg-new.sql" -T "$DUR"); then
        floor_row postgres new "$PG_POOL" "$tps"
    fi
    # The 1,000 replay keys: claimed and completed by the same statements (commits
    # unsynchronised: only the reads that follow are measured).
    if PGOPTIONS='-c synchronous_commit=off' pgbench_tps 1 "$WORK/pg-prefill.sql" -t 7000 >/dev/null &&
        tps=$(pgbench_tps "$PG_POOL" "$WORK/pg-replay.sql" -T "$DUR"); then
        floor_row postgres replay "$PG_POOL" "$tps"
    fi
    reset_store postgres
elif [ "$HAVE_PG" = 1 ]; then
    loud "SKIPPED: pgbench not installed: no PostgreSQL floor"
fi
# ---- end of store floors

# ---------------------------------------------------------------- memory per record
loud "memory store: bytes per record"
start_idem memory
rss0=$(status_kb "$IDEM_PID" VmRSS)
wrk_run idem memory new memrec "$IDEM_URL" "" "$IDEM_PID"
sleep 1
rss1=$(status_kb "$IDEM_PID" VmRSS)
recs=$(awk -v r="$LAST_RPS" -v d="$DUR" 'BEGIN{printf "%d", r*d}')
printf 'idem\tmemory\tbytes_per_record\t%s records\t-\t-\t%s\t-\t-\t-\t-\t-\t-\t%s\n' "$recs" \
    "$(awk -v a="$rss0" -v b="$rss1" -v n="$recs" 'BEGIN{printf "%.0f", (b-a)*1024/n}')" "$rss1" >>"$TSV"
stop_idem

# ---------------------------------------------------------------- cost growth
fill_store() { # store, from, to: filler records in the store's own schema
    local store="$1" from="$2" to="$3" now
    now=$(date +%s%3N)
    case "$store" in
        sqlite) python3 - "$WORK/idem.db" "$from" "$to" "$now" <<'PY'
import sqlite3, sys
db, lo, hi, now = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = sqlite3.connect(db)
c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=OFF"); c.execute("PRAGMA cache_size=-1000000")
step = 200000
for a in range(lo, hi, step):
    b = min(hi, a + step)
    c.execute("""WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?)
        INSERT OR IGNORE INTO idem_records (id, tenant, route, key, fingerprint, token, lease_expires_at,
            response, created_at, expires_at)
        SELECT randomblob(32), 't_fill', 'POST /v1/charges', 'fill-' || i, lower(hex(randomblob(32))),
            NULL, NULL, randomblob(200), ?, ? FROM n""", (a, b, now, now + 86400000))
    c.commit()
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
PY
            ;;
        redis) # server-side Lua, 100k records per call: no client round trips
            local a=$from b
            while [ "$a" -lt "$to" ]; do
                b=$(( a + 100000 < to ? a + 100000 : to ))
                rcli -n 0 EVAL "
local now = tonumber(ARGV[3])
local body = string.rep('x', 200)
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do
  local k = 'idem:{' .. redis.sha1hex('fill' .. i) .. '000000000000000000000000}'
  redis.call('HSET', k, 'f', redis.sha1hex('f' .. i), 'r', body, 'c', now, 'e', now + 86400000)
  redis.call('PEXPIREAT', k, now + 86400000)
end
return 1" 0 "$a" "$b" "$now" >/dev/null
                a=$b
            done
            ;;
        postgres)
            psql "$PG_URL" -qAt >/dev/null <<SQL
SET synchronous_commit = off;
INSERT INTO idem_records (id, tenant, route, key, fingerprint, token, lease_expires_at, response, created_at, expires_at)
SELECT decode(md5('a' || i) || md5('b' || i), 'hex'), 't_fill', 'POST /v1/charges', 'fill-' || i,
       md5('f' || i) || md5('g' || i), NULL, NULL, decode(repeat(md5(i::text), 12) || md5('r'), 'hex'),
       now(), now() + interval '1 day'
FROM generate_series($from, $to - 1) AS i
ON CONFLICT DO NOTHING;
VACUUM ANALYZE idem_records;
SQL
            ;;
    esac
}
count_store() {
    case "$1" in
        sqlite) python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from idem_records').fetchone()[0])" "$WORK/idem.db" ;;
        redis) rcli -n 0 DBSIZE ;;
        postgres) psql "$PG_URL" -qAtc "SELECT count(*) FROM idem_records" ;;
    esac
}
for store in "${STORES[@]}"; do
    [ "$store" = memory ] && continue
    if [ "$store" = sqlite ] && ! command -v python3 >/dev/null 2>&1; then
        loud "SKIPPED: sqlite cost growth needs python3 (its sqlite3 module fills the file)"; continue
    fi
    loud "cost growth on $store: 1k stored records, then $FILL"
    reset_store "$store"
    start_idem "$store"; stop_idem   # creates the schema
    fill_store "$store" 0 1000
    start_idem "$store"
    wrk_run idem "$store" new "grow-1k" "$IDEM_URL" "" "$IDEM_PID"
    stop_idem
    t0=$(date +%s)
    fill_store "$store" 1000 "$FILL"
    log "$store filled to $(count_store "$store") records in $(( $(date +%s) - t0 ))s"
    start_idem "$store"
    wrk_run idem "$store" new "grow-$FILL" "$IDEM_URL" "" "$IDEM_PID"
    stop_idem
done

# ---------------------------------------------------------------- report
if command -v python3 >/dev/null 2>&1; then
    python3 "$BENCH/report.py" "$TSV" "$MODE" || log "WARNING: report.py failed"
else
    loud "SKIPPED: report (python3 missing); raw rows in $TSV"
fi
loud "done: $TSV"
