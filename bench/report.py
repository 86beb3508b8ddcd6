#!/usr/bin/env python3
"""Turns bench/results/<mode>.tsv into <mode>.md (tables, ratios, targets) and, when
matplotlib is importable, <mode>.png. Usage: report.py RESULTS.tsv MODE"""

import csv
import os
import sys

tsv, mode = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(tsv), delimiter="\t"))
out_md = os.path.splitext(tsv)[0] + ".md"
out_png = os.path.splitext(tsv)[0] + ".png"


def f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def pick(target, store, scen, kind):
    for r in rows:
        if (r["target"], r["store"], r["scenario"], r["kind"]) == (target, store, scen, kind):
            return r
    return None


direct = f(pick("direct", "-", "pass", "sat")["rps"])
nginx_runs = [f(r["rps"]) for r in rows if r["target"] == "nginx" and r["kind"] == "sat"]
nginx = sum(nginx_runs) / len(nginx_runs)
direct_lat = pick("direct", "-", "pass", "lat")
stores = [s for s in ["memory", "sqlite", "redis", "postgres"] if pick("idem", s, "pass", "sat")]
scens = ["pass", "new", "replay", "storm"]
names = {"pass": "POST, no key", "new": "new key", "replay": "replay (1,000 keys)", "storm": "duplicate storm"}
lines = []
w = lines.append

# The floor: a proxy of idem's own crates doing nothing else (bench/floor-proxy), in the
# serving model idem uses (per-core); its `answer` mode is the floor of a replay.
FLOOR_MODEL = "per-core"


def floor_of(scen, model=FLOOR_MODEL):
    r = pick("floor", model, "replay" if scen == "replay" else "pass", "sat")
    return f(r["rps"]) if r else None


w(f"nginx yardstick: {nginx:,.0f} req/s (mean of {len(nginx_runs)} runs: "
  + ", ".join(f"{x:,.0f}" for x in nginx_runs) + f"); direct upstream: {direct:,.0f} req/s.")
if floor_of("pass"):
    w(f"Floor ({FLOOR_MODEL}): proxy {floor_of('pass'):,.0f} req/s ({floor_of('pass') / nginx:.2f} × nginx), "
      f"answering from memory {floor_of('replay'):,.0f} req/s ({floor_of('replay') / nginx:.2f} × nginx). "
      "× floor is idem over the floor of the same work: the proxy for pass-through, new keys and storms, "
      "the answer from memory for replays.")
w("")
w("### Throughput at saturation (wrk -t2 -c64)")
w("")
w("| scenario | store | req/s | × direct | × nginx | × floor | idem CPU | idem VmHWM | non-2xx |")
w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for s in scens:
    for st in stores + ["node-redis"]:
        r = pick("idem" if st != "node-redis" else "peer", st, s, "sat")
        if not r:
            continue
        rps = f(r["rps"])
        hwm = f(r["hwm_kb"])
        fl = floor_of(s)
        who = st if st != "node-redis" else "**peer**: node + Redis"
        w(f"| {names[s]} | {who} | {rps:,.0f} | {rps / direct:.2f} | {rps / nginx:.2f} | "
          f"{f'{rps / fl:.2f}' if fl else '-'} | "
          f"{r['cpu_pct'] + '%' if r['cpu_pct'] != '-' else '-'} | "
          f"{f'{hwm / 1024:.0f} MiB' if hwm else '-'} | {r['non2xx']} |")
w("")
models = [m for m in ["shared", "per-core"] if pick("floor", m, "pass", "sat")]
if models:
    w("### Serving model: the floor proxy in each (same run)")
    w("")
    w("| model | proxy req/s | × nginx | floor CPU | answer from memory req/s | × nginx |")
    w("| --- | ---: | ---: | ---: | ---: | ---: |")
    for m in models:
        p, a = pick("floor", m, "pass", "sat"), pick("floor", m, "replay", "sat")
        w(f"| {m} | {f(p['rps']):,.0f} | {f(p['rps']) / nginx:.2f} | {p['cpu_pct']}% | "
          f"{f(a['rps']):,.0f} | {f(a['rps']) / nginx:.2f} |")
    auto = pick("floor", f"{FLOOR_MODEL}-auto", "pass", "sat")
    if auto:
        w(f"| {FLOOR_MODEL}, h2c detection (hyper-util `auto`) | {f(auto['rps']):,.0f} | "
          f"{f(auto['rps']) / nginx:.2f} | {auto['cpu_pct']}% | | |")
    w("")
lat_rate = direct_lat["rate"] if direct_lat else "?"
w(f"### Latency at a fixed {lat_rate} req/s (half nginx's saturation; wrk -c32 with a Lua delay)")
w("")
w("| scenario | target | achieved req/s | p50 ms | p99 ms | p99.9 ms | added p99 vs direct |")
w("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
dp99 = f(direct_lat["p99_us"]) if direct_lat else None
for r in rows:
    if r["kind"] != "lat":
        continue
    who = r["target"] if r["store"] == "-" else f"{r['target']} {r['store']}"
    added = f(r["p99_us"]) - dp99 if dp99 is not None else None
    w(f"| {names[r['scenario']]} | {who} | {f(r['rps']):,.0f} | {f(r['p50_us']) / 1000:.2f} | "
      f"{f(r['p99_us']) / 1000:.2f} | {f(r['p999_us']) / 1000:.2f} | "
      f"{'-' if r['target'] == 'direct' else f'{added / 1000:+.2f} ms'} |")
w("")
w("### Cost growth: unique-key throughput with few vs many stored records")
w("")
w("| store | req/s, ~1k records | req/s, filled | records filled | cost |")
w("| --- | ---: | ---: | ---: | ---: |")
growth = {}
for st in stores:
    small = pick("idem", st, "new", "grow-1k")
    big = [r for r in rows if r["store"] == st and r["kind"].startswith("grow-") and r["kind"] != "grow-1k"]
    if small and big:
        a, b = f(small["rps"]), f(big[0]["rps"])
        growth[st] = 1 - b / a
        w(f"| {st} | {a:,.0f} | {b:,.0f} | {int(big[0]['kind'][5:]):,} | {growth[st] * 100:+.1f}% |")
w("")
mem = [r for r in rows if r["scenario"] == "bytes_per_record"]
if mem:
    w(f"Memory store: **{f(mem[0]['rps']):,.0f} bytes per record** (RSS delta over {mem[0]['kind']}, "
      f"response body 93 bytes).")
    w("")

up_http = [r for r in rows if (r["target"], r["kind"]) == ("idem", "up-http")]
up_https = [r for r in rows if (r["target"], r["kind"]) == ("idem", "up-https")]
if up_http and up_https:
    w("### Upstream over TLS: new key, memory store (runs alternated)")
    w("")
    w("| upstream | req/s (mean) | p50 ms | p99 ms | idem CPU |")
    w("| --- | ---: | ---: | ---: | ---: |")
    means = {}
    for name, runs in [("http://", up_http), ("https:// (TLS 1.3, HTTP/1.1)", up_https)]:
        n = len(runs)
        means[name] = sum(f(r["rps"]) for r in runs) / n
        p50 = sum(f(r["p50_us"]) for r in runs) / n / 1000
        p99 = sum(f(r["p99_us"]) for r in runs) / n / 1000
        cpu = "/".join(r["cpu_pct"] + "%" for r in runs)
        w(f"| {name} | {means[name]:,.0f} | {p50:.2f} | {p99:.2f} | {cpu} |")
    w("")
    http_rps, https_rps = means.values()
    w(f"https / http throughput: **{https_rps / http_rps:.2f}**")
    w("")

layer_cost = {}
if pick("layer", "plain", "new", "sat") and pick("layer", "layer", "new", "sat"):
    w("### Tower layer: the payments example (axum) without and with it, memory store")
    w("")
    w("| scenario | without req/s | with req/s | layer's cost | CPU without / with |")
    w("| --- | ---: | ---: | ---: | ---: |")
    for s in ["pass", "new"]:
        a, b = pick("layer", "plain", s, "sat"), pick("layer", "layer", s, "sat")
        layer_cost[s] = 1 - f(b["rps"]) / f(a["rps"])
        w(f"| {names[s]} | {f(a['rps']):,.0f} | {f(b['rps']):,.0f} | {layer_cost[s] * 100:+.1f}% | "
          f"{a['cpu_pct']}% / {b['cpu_pct']}% |")
    w("")

# targets
w("### Targets")
w("")
w("| target | wanted | measured | |")
w("| --- | --- | ---: | --- |")


def ratio(st, s, base):
    r = pick("idem", st, s, "sat")
    return f(r["rps"]) / base if r else None


def check(name, want, got, higher=True):
    if got is None:
        w(f"| {name} | {want} | n/a | skipped |")
        return
    ok = got >= want if higher else got <= want
    sign = "≥" if higher else "≤"
    w(f"| {name} | {sign} {want:g} | {got:.2f} | {'met' if ok else f'**missed** by {abs(got - want) / want * 100:.0f}%'} |")


# The request path (memory store): each target × nginx, or, where the floor measured
# in this run is itself below it, a share of the floor.
for s, want, of_floor in [("pass", 1.0, 0.97), ("new", 0.9, 0.9), ("replay", 2.0, None), ("storm", 1.5, None)]:
    got = ratio("memory", s, nginx)
    fl = floor_of(s)
    if got is not None and got < want and of_floor and fl and fl / nginx < want:
        check(f"{names[s]} (memory) × floor (floor {fl / nginx:.2f} × nginx < {want:g})", of_floor,
              ratio("memory", s, fl))
    else:
        check(f"{names[s]} (memory) × nginx", want, got)
for s, want in [("pass", 0.5), ("new", 1.0), ("replay", 0.5)]:
    r = pick("idem", "memory", s, "lat")
    check(f"added p99 ms, {names[s]}, memory", want, (f(r["p99_us"]) - dp99) / 1000 if r and dp99 else None,
          higher=False)
for s, want in [("pass", 0.05), ("new", 0.10)]:
    check(f"Tower layer's cost, {names[s]} (fraction)", want, layer_cost.get(s), higher=False)
# The durable stores' targets are in their own table, against their floors (below).

# ---- durable stores against their floors
def store_floors_table():
    """Per durable store: idem against the memory store and against the store's own
    floor (its statements without idem, same run), with the durable-store targets."""
    floors = [r for r in rows if r["target"] == "floor"]
    if not floors:
        return
    w("### Durable stores against their floors")
    w("")
    w("Floor: the store's own statements driven without idem (bench/floors, pgbench), in "
      "this run; pairs of claim + complete per second for new keys, reads per second for "
      "replays. At 0.8 × its floor a store has little left to gain on idem's side.")
    w("")
    w("| store | scenario | idem req/s | × memory | floor ops/s | × floor |")
    w("| --- | --- | ---: | ---: | ---: | ---: |")
    for st in ["sqlite", "redis", "postgres"]:
        for s in ["new", "replay"]:
            r, m, fl = pick("idem", st, s, "sat"), pick("idem", "memory", s, "sat"), pick("floor", st, s, "sat")
            if not r:
                continue
            rps = f(r["rps"])
            xm = f"{rps / f(m['rps']):.2f}" if m else "-"
            fv = f(fl["rps"]) if fl else None
            w(f"| {st} | {names[s]} | {rps:,.0f} | {xm} | {f'{fv:,.0f}' if fv else '-'} | "
              f"{f'{rps / fv:.2f}' if fv else '-'} |")
    w("")
    w("| store | new key × memory | replay × memory | new key × peer | replay × peer | "
      "added p99, new key | cost growth at the fill |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    targets = {"sqlite": (0.6, 0.9, 2.0), "redis": (0.7, 0.8, 2.0), "postgres": (0.4, 0.6, 4.0)}
    peer = {s: pick("peer", "node-redis", s, "sat") for s in ["new", "replay"]}

    def cell(got, want, higher=True, fmt="{:.2f}"):
        if got is None:
            return f"n/a (want {'≥' if higher else '≤'} {want:g})"
        ok = got >= want if higher else got <= want
        mark = "met" if ok else "**missed**"
        return f"{fmt.format(got)} ({'≥' if higher else '≤'} {want:g}: {mark})"

    for st, (want_new, want_replay, want_p99) in targets.items():
        if not pick("idem", st, "new", "sat"):
            continue
        xs = {}
        for s in ["new", "replay"]:
            r, m = pick("idem", st, s, "sat"), pick("idem", "memory", s, "sat")
            xs[s] = (f(r["rps"]) / f(m["rps"]) if r and m else None,
                     f(r["rps"]) / f(peer[s]["rps"]) if r and peer[s] else None)
        lat = pick("idem", st, "new", "lat")
        added = (f(lat["p99_us"]) - dp99) / 1000 if lat and dp99 is not None else None
        w(f"| {st} | {cell(xs['new'][0], want_new)} | {cell(xs['replay'][0], want_replay)} | "
          f"{cell(xs['new'][1], 3.0)} | {cell(xs['replay'][1], 2.0)} | "
          f"{cell(added, want_p99, False, '{:+.2f} ms')} | "
          f"{cell(growth[st] * 100 if st in growth else None, 15.0, False, '{:.1f}%')} |")
    w("")


store_floors_table()
# ---- end of durable stores

open(out_md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

if mode != "smoke":
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install matplotlib)", file=sys.stderr)
        sys.exit(0)
    peer_new = pick("peer", "node-redis", "new", "sat")
    series = stores + (["node-redis"] if peer_new else [])
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(series)
    for i, st in enumerate(series):
        vals = []
        for s in scens:
            r = pick("idem" if st != "node-redis" else "peer", st, s, "sat")
            vals.append(f(r["rps"]) if r else 0)
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(scens))]
        ax.bar(xs, vals, width, label=f"idem {st}" if st != "node-redis" else "node-idempotency + Redis")
    ax.axhline(nginx, color="black", linestyle="--", label=f"nginx proxy ({nginx:,.0f})")
    ax.axhline(direct, color="grey", linestyle=":", label=f"direct upstream ({direct:,.0f})")
    ax.set_xticks(range(len(scens)))
    ax.set_xticklabels([names[s] for s in scens])
    ax.set_ylabel("requests/s at saturation (wrk -t2 -c64)")
    ax.set_title("idem throughput per scenario and store, one run, 2 cores")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"plot: {out_png}")
