-- wrk script for idem's benchmark. Chosen by environment variables:
--   SCENARIO  pass | new | replay | storm
--   RUN       a string unique to this run and target, so "new" keys never repeat
--   RATE      if set (requests/s over all connections), each connection waits
--             connections/RATE seconds between requests: a fixed, below-saturation
--             rate for latency percentiles. wrk is closed-loop: a slow answer delays
--             that connection's next request (coordinated omission), so the achieved
--             rate is printed next to the percentiles.
--   CONNS     the -c value, needed with RATE.
--   STORM_GROUP  storm: consecutive requests of a thread sharing one key (default 32)
-- done() prints one machine-readable RESULT line.

local scenario = os.getenv("SCENARIO") or "pass"
local run = os.getenv("RUN") or tostring(os.time())
local rate = tonumber(os.getenv("RATE") or "")
local conns = tonumber(os.getenv("CONNS") or "1")
local group = tonumber(os.getenv("STORM_GROUP") or "32")
local nthreads = 0
local threads = {}

wrk.method = "POST"
wrk.path = "/v1/charges"
wrk.body = '{"amount":1500,"currency":"brl","customer":"cus_bench"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk_bench_tenant"

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
  table.insert(threads, thread)
end

local counter = 0
local mean_delay = 0

function init(args)
  if rate and rate > 0 then
    mean_delay = conns * 1000 / rate
  end
  math.randomseed(os.time() + (tid or 0) * 7919)
end

-- Defined only with RATE: wrk schedules every request through a timer when the
-- script has a delay(), which would cost throughput in saturation runs.
if rate and rate > 0 then
  function delay()
    -- wrk's delay is in whole ms: dither between floor and ceil to hit the mean.
    local d = math.floor(mean_delay)
    if math.random() < mean_delay - d then d = d + 1 end
    return d
  end
end

function request()
  counter = counter + 1
  local key
  if scenario == "new" then
    key = run .. "-" .. tid .. "-" .. counter
  elseif scenario == "replay" then
    key = "replay-" .. ((counter * 2 + tid) % 1000)
  elseif scenario == "storm" then
    key = run .. "-storm-" .. math.floor(counter / group)
  end
  if key then
    -- wrk.format replaces wrk.headers when given headers: pass them all.
    local h = {}
    for k, v in pairs(wrk.headers) do h[k] = v end
    h["Idempotency-Key"] = key
    return wrk.format(nil, nil, h)
  end
  return wrk.format()
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    "RESULT requests=%d secs=%.3f rps=%.1f p50_us=%d p99_us=%d p999_us=%d non2xx=%d sock_errors=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.status, e.connect + e.read + e.write + e.timeout))
end
