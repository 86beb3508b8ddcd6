// The peer in idem's benchmark: what a Node team writes today with
// @node-idempotency/core and its Redis storage adapter, in front of the same upstream
// as idem. One worker per core (node:cluster), keep-alive to the upstream.
//
//   PORT=8090 UPSTREAM=http://127.0.0.1:18081 REDIS_URL=redis://127.0.0.1:6391/0 node server.js
"use strict";
const cluster = require("node:cluster");
const http = require("node:http");
const os = require("node:os");
const { Idempotency, IdempotencyError, IdempotencyErrorCodes } = require("@node-idempotency/core");
const { RedisStorageAdapter } = require("@node-idempotency/storage-adapter-redis");

const port = Number(process.env.PORT || 8090);
const upstream = new URL(process.env.UPSTREAM || "http://127.0.0.1:18081");
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379/0";
const workers = Number(process.env.WORKERS || os.availableParallelism());

if (cluster.isPrimary && workers > 1) {
  for (let i = 0; i < workers; i++) cluster.fork();
  process.on("SIGTERM", () => {
    for (const w of Object.values(cluster.workers)) w.kill("SIGTERM");
    process.exit(0);
  });
} else {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}

async function main() {
  const storage = new RedisStorageAdapter({ url: redisUrl });
  await storage.connect();
  const idem = new Idempotency(storage, { cacheTTLMS: 24 * 3600 * 1000 });
  const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });

  const forward = (req, body) =>
    new Promise((resolve, reject) => {
      const headers = { ...req.headers, host: upstream.host };
      delete headers.connection;
      const r = http.request(
        { host: upstream.hostname, port: upstream.port, path: req.url, method: req.method, headers, agent },
        (res) => {
          const chunks = [];
          res.on("data", (c) => chunks.push(c));
          res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
          res.on("error", reject);
        },
      );
      r.on("error", reject);
      r.end(body);
    });

  const send = (res, status, headers, body) => {
    const h = { ...headers };
    delete h.connection;
    delete h["keep-alive"];
    delete h["transfer-encoding"];
    h["content-length"] = Buffer.byteLength(body);
    res.writeHead(status, h);
    res.end(body);
  };

  http
    .createServer((req, res) => {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", async () => {
        const raw = Buffer.concat(chunks);
        let parsed;
        try {
          parsed = raw.length ? JSON.parse(raw.toString("utf8")) : undefined;
        } catch {
          parsed = { raw: raw.toString("base64") };
        }
        const params = { headers: req.headers, path: req.url, method: req.method, body: parsed };
        try {
          const cached = await idem.onRequest(params);
          if (cached) {
            const a = cached.additional || {};
            send(res, a.status || 200, { ...(a.headers || {}), "idempotent-replayed": "true" }, cached.body || "");
            return;
          }
          const up = await forward(req, raw);
          const body = up.body.toString("utf8");
          await idem.onResponse(params, { body, additional: { status: up.status, headers: up.headers } });
          send(res, up.status, up.headers, body);
        } catch (e) {
          if (e instanceof IdempotencyError) {
            const status = e.code === IdempotencyErrorCodes.REQUEST_IN_PROGRESS ? 409
              : e.code === IdempotencyErrorCodes.IDEMPOTENCY_FINGERPRINT_MISSMATCH ? 422 : 400;
            send(res, status, { "content-type": "application/json" }, JSON.stringify({ error: e.code }));
          } else {
            send(res, 502, { "content-type": "text/plain" }, String(e && e.message));
          }
        }
      });
    })
    .listen(port, "127.0.0.1");
}
