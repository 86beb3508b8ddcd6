// The idem admin page: polls /metrics, /api/in-flight and /api/config with the
// session cookie, and computes rates and percentiles in the browser from the same
// counters and histograms Prometheus scrapes.
"use strict";

const POLL_MS = 2000;
const WINDOW = 10; // snapshots kept: rates and percentiles over the last ~20 s
const GROUPS = {
  executed: ["executed"],
  replayed: ["replayed"],
  in_use: ["in_use"],
  mismatch: ["reused"],
  rejected: ["invalid", "missing", "too_large", "rejected", "abandoned", "unknown", "other"],
  passed: ["unprotected", "passthrough"],
  store_errors: ["store_error", "passthrough"],
};
const snapshots = [];
let timer = null;

const $ = (id) => document.getElementById(id);
const headers = { "x-requested-with": "idem-admin" };

async function api(path, options = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...options, headers: { ...headers, ...(options.headers || {}) } });
  if (res.status === 401) { showLogin(); throw new Error("unauthorized"); }
  return res;
}

// Prometheus text: [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function sum(samples, name, filter = () => true) {
  return samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

// Cumulative buckets {le: count} of one histogram series, summed over matching labels.
function buckets(samples, name, filter) {
  const b = new Map();
  for (const s of samples) {
    if (s.name !== name + "_bucket" || !filter(s.labels)) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    b.set(le, (b.get(le) || 0) + s.value);
  }
  return b;
}

// histogram_quantile over the difference of two cumulative bucket sets.
function quantile(q, now, then) {
  const les = [...now.keys()].sort((a, b) => a - b);
  const counts = les.map((le) => (now.get(le) || 0) - ((then && then.get(le)) || 0));
  const total = counts[counts.length - 1] || 0;
  if (total <= 0) return null;
  const rank = q * total;
  for (let i = 0; i < les.length; i++) {
    if (counts[i] >= rank) {
      if (les[i] === Infinity) return les[i - 1] || 0;
      const lo = i === 0 ? 0 : les[i - 1];
      const below = i === 0 ? 0 : counts[i - 1];
      const inBucket = counts[i] - below;
      return lo + (les[i] - lo) * (inBucket ? (rank - below) / inBucket : 0);
    }
  }
  return null;
}

function fmtMs(seconds) {
  if (seconds === null) return "–";
  const ms = seconds * 1000;
  return ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : ms.toFixed(0);
}

function fmtAge(ms) {
  const s = Math.abs(ms) / 1000;
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function renderRates(newest, oldest) {
  const dt = oldest ? (newest.at - oldest.at) / 1000 : 0;
  for (const [group, outcomes] of Object.entries(GROUPS)) {
    const f = (l) => outcomes.includes(l.outcome);
    const total = sum(newest.samples, "idem_requests_total", f);
    $("total-" + group).textContent = String(total);
    const rate = dt > 0 ? (total - sum(oldest.samples, "idem_requests_total", f)) / dt : null;
    $("rate-" + group).textContent = rate === null ? "–" : rate.toFixed(rate < 10 ? 2 : 1);
    $("rate-" + group).parentElement.classList.toggle("firing", rate !== null && rate > 0);
  }
  $("window").textContent = dt > 0 ? `over the last ${dt.toFixed(0)} s` : "";
}

function latencyRows(newest, oldest) {
  const rows = [];
  const ops = new Set(newest.samples.filter((s) => s.name === "idem_store_latency_seconds_count").map((s) => s.labels.store + " " + s.labels.op));
  for (const key of [...ops].sort()) {
    const [store, op] = key.split(" ");
    rows.push([`store ${op} (${store})`, "idem_store_latency_seconds", (l) => l.op === op && l.store === store]);
  }
  rows.unshift(["upstream", "idem_upstream_latency_seconds", () => true]);
  rows.unshift(["request (all outcomes)", "idem_request_duration_seconds", () => true]);
  return rows;
}

function renderLatency(newest, oldest) {
  const body = $("latency").querySelector("tbody");
  body.replaceChildren();
  for (const [label, name, filter] of latencyRows(newest, oldest)) {
    const now = buckets(newest.samples, name, filter);
    const then = oldest ? buckets(oldest.samples, name, filter) : null;
    const count = sum(newest.samples, name + "_count", filter);
    const tr = document.createElement("tr");
    for (const text of [label, fmtMs(quantile(0.5, now, then)), fmtMs(quantile(0.9, now, then)), fmtMs(quantile(0.99, now, then)), String(count)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    body.append(tr);
  }
}

function cell(tr, label, text, cls) {
  const td = document.createElement("td");
  td.dataset.label = label;
  td.textContent = text;
  if (cls) td.className = cls;
  tr.append(td);
  return td;
}

// Keys whose Release button was pressed once, until when: the second press releases.
// Kept by key, so the confirmation survives the table's redraws.
const confirming = new Map();

function releaseButton(record) {
  const id = JSON.stringify([record.tenant, record.route, record.key]);
  const button = document.createElement("button");
  button.type = "button";
  const render = () => {
    const armed = (confirming.get(id) || 0) > Date.now();
    button.className = "danger release" + (armed ? " confirm" : "");
    button.textContent = armed ? "Confirm release" : "Release";
  };
  render();
  button.addEventListener("click", async () => {
    if (!((confirming.get(id) || 0) > Date.now())) {
      confirming.set(id, Date.now() + 8000);
      render();
      return;
    }
    confirming.delete(id);
    const q = new URLSearchParams({ route: record.route, key: record.key, tenant: record.tenant });
    const res = await api("/keys/release?" + q, { method: "POST" });
    const doc = await res.json();
    $("release-result").textContent = res.ok ? `released ${record.key}` : `not released: ${doc.detail || res.status}`;
    refresh();
  });
  return button;
}

async function renderInFlight() {
  const doc = await (await api("/api/in-flight?limit=100")).json();
  const body = $("in-flight").querySelector("tbody");
  body.replaceChildren();
  for (const r of doc.records || []) {
    const tr = document.createElement("tr");
    tr.dataset.key = r.key;
    if (r.abandoned) tr.className = "abandoned";
    cell(tr, "age", fmtAge(r.age_ms));
    cell(tr, "route", r.route);
    cell(tr, "key", r.key, "key");
    cell(tr, "tenant", r.tenant.length > 14 ? r.tenant.slice(0, 14) + "…" : r.tenant, "tenant").title = r.tenant;
    cell(tr, "lease", r.lease_left_ms > 0 ? "ends in " + fmtAge(r.lease_left_ms) : "ended " + fmtAge(r.lease_left_ms) + " ago");
    cell(tr, "", "").append(releaseButton(r));
    body.append(tr);
  }
  const n = (doc.records || []).length;
  $("in-flight-count").textContent = n ? `${n} oldest first` : "";
  $("in-flight-empty").classList.toggle("hidden", n > 0);
}

async function refresh() {
  try {
    const text = await (await api("/metrics")).text();
    snapshots.push({ at: Date.now(), samples: parseMetrics(text) });
    while (snapshots.length > WINDOW) snapshots.shift();
    const newest = snapshots[snapshots.length - 1];
    const oldest = snapshots.length > 1 ? snapshots[0] : null;
    renderRates(newest, oldest);
    renderLatency(newest, oldest);
    await renderInFlight();
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e.message !== "unauthorized") $("status").textContent = "update failed: " + e.message;
  }
}

function showLogin() {
  clearInterval(timer);
  timer = null;
  $("dashboard").classList.add("hidden");
  $("logout").classList.add("hidden");
  $("login").classList.remove("hidden");
  $("status").textContent = "";
}

async function showDashboard() {
  $("login").classList.add("hidden");
  $("dashboard").classList.remove("hidden");
  $("logout").classList.remove("hidden");
  $("config").textContent = JSON.stringify(await (await api("/api/config")).json(), null, 2);
  await refresh();
  if (!timer) timer = setInterval(refresh, POLL_MS);
}

async function login(event) {
  event.preventDefault();
  const res = await fetch("/login", { method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" }, body: JSON.stringify({ token: $("token").value }) });
  $("token").value = "";
  if (!res.ok) { $("login-error").textContent = (await res.json()).detail || "refused"; return; }
  $("login-error").textContent = "";
  showDashboard();
}

async function lookup(event) {
  event.preventDefault();
  const q = new URLSearchParams({ route: $("lookup-route").value, key: $("lookup-key").value });
  if ($("lookup-tenant").value) q.set("tenant", $("lookup-tenant").value);
  const res = await api("/keys?" + q);
  $("lookup-result").textContent = JSON.stringify(await res.json(), null, 2);
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", login);
  $("lookup-form").addEventListener("submit", lookup);
  $("logout").addEventListener("click", async () => { await api("/logout", { method: "POST" }); showLogin(); });
  const res = await fetch("/api/session", { credentials: "same-origin" });
  if (res.ok) showDashboard(); else showLogin();
});
