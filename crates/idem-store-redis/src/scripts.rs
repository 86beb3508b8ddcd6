//! The Lua scripts: each state change is one script, atomic on the server, judged by
//! the server's clock. A record is a hash with fields `f` (fingerprint), `t` (token,
//! while in flight), `l` (lease end, ms), `r` (stored response, once completed),
//! `c` (created, ms) and `e` (expiry, ms); the key also carries a native expiry at `e`.

use std::sync::LazyLock;

use redis::Script;

/// Server time in ms, and integer formatting that never goes through `%g`.
const PRELUDE: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function s(n) return string.format('%d', n) end
";

/// Returns `[fingerprint, token, lease, response, created, expires]` when the record
/// at KEYS[1] is live, else nil.
const READ: &str = r"
local function live_record()
  local h = redis.call('HMGET', KEYS[1], 'f', 't', 'l', 'r', 'c', 'e')
  if h[6] and tonumber(h[6]) > now then return h end
  return nil
end
";

/// True when the record is live, in flight, and held by `token`.
const HELD: &str = r"
local function held_by(token)
  local h = redis.call('HMGET', KEYS[1], 't', 'e')
  return h[2] and tonumber(h[2]) > now and h[1] == token
end
";

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{READ}{HELD}{body}"))
}

/// ARGV: fingerprint, token, lease ms, ttl ms. Returns `{1, lease_end}` when acquired
/// (an expired record is replaced), or `{0, <record fields>}`.
pub(crate) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local h = live_record()
if h then return {0, h[1], h[2], h[3], h[4], h[5], h[6]} end
local lease = now + tonumber(ARGV[3])
local exp = now + math.max(tonumber(ARGV[3]), tonumber(ARGV[4]))
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'f', ARGV[1], 't', ARGV[2], 'l', s(lease), 'c', s(now), 'e', s(exp))
redis.call('PEXPIREAT', KEYS[1], s(exp))
return {1, s(lease)}
",
    )
});

/// ARGV: stale token, new token, fingerprint, lease ms, ttl ms, channel. Takes over a
/// live in-flight record held by the stale token whose lease ended; keeps `c`.
/// Returns the new lease end, or nil.
pub(crate) static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if not held_by(ARGV[1]) then return nil end
local l = tonumber(redis.call('HGET', KEYS[1], 'l'))
if l > now then return nil end
local lease = now + tonumber(ARGV[4])
local exp = now + math.max(tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 't', ARGV[2], 'f', ARGV[3], 'l', s(lease), 'e', s(exp))
redis.call('PEXPIREAT', KEYS[1], s(exp))
redis.call('PUBLISH', ARGV[6], '')
return s(lease)
",
    )
});

/// ARGV: token, encoded response, ttl ms, channel. Returns 1 when stored.
pub(crate) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if not held_by(ARGV[1]) then return 0 end
local exp = now + tonumber(ARGV[3])
redis.call('HDEL', KEYS[1], 't', 'l')
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'e', s(exp))
redis.call('PEXPIREAT', KEYS[1], s(exp))
redis.call('PUBLISH', ARGV[4], '')
return 1
",
    )
});

/// ARGV: token, channel. Returns 1 when the in-flight record was deleted.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if not held_by(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], '')
return 1
",
    )
});

/// ARGV: token, lease ms. Returns 1 when the lease was extended; the record's expiry
/// moves with it when the lease would outlive it (never expire under a live lease).
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if not held_by(ARGV[1]) then return 0 end
local lease = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'l', s(lease))
if lease > tonumber(redis.call('HGET', KEYS[1], 'e')) then
  redis.call('HSET', KEYS[1], 'e', s(lease))
  redis.call('PEXPIREAT', KEYS[1], s(lease))
end
return 1
",
    )
});

/// Returns the live record's fields, or nil.
pub(crate) static GET: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
return live_record()
",
    )
});

/// ARGV: channel. Deletes whatever is there; returns 1 when something was.
pub(crate) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local n = redis.call('DEL', KEYS[1])
if n == 1 then redis.call('PUBLISH', ARGV[1], '') end
return n
",
    )
});

/// Per-tenant counts: KEYS[1] (in flight) and KEYS[2] (live records) are sorted sets
/// of storage ids scored by slot expiry (ms), in one Cluster slot (`{tenant}`).
const SLOTS: &str = r"
local function extend(k, life)
  if redis.call('PTTL', k) < life then redis.call('PEXPIRE', k, s(life)) end
end
local function put(k, member, life)
  redis.call('ZADD', k, s(now + life), member)
  extend(k, life)
end
";

/// ARGV: storage id, lease ms, ttl ms, in-flight cap, record cap (`''`: none).
/// Returns 0 when admitted, 1 when the in-flight cap is reached, 2 for records.
pub(crate) static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        "{SLOTS}{}",
        r"
local function room(k, max)
  if max == '' then return true end
  max = tonumber(max)
  local e = redis.call('ZSCORE', k, ARGV[1])
  if e and tonumber(e) > now then return true end
  if redis.call('ZCARD', k) < max then return true end
  redis.call('ZREMRANGEBYSCORE', k, '-inf', s(now))
  return redis.call('ZCARD', k) < max
end
if not room(KEYS[1], ARGV[4]) then return 1 end
if not room(KEYS[2], ARGV[5]) then return 2 end
if ARGV[4] ~= '' then put(KEYS[1], ARGV[1], tonumber(ARGV[2])) end
if ARGV[5] ~= '' then put(KEYS[2], ARGV[1], tonumber(ARGV[3])) end
return 0
"
    ))
});

/// ARGV: storage id, retention ms (`''`: released). Ends the in-flight slot; the
/// record slot is kept for the retention, or removed.
pub(crate) static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        "{SLOTS}{}",
        r"
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  put(KEYS[2], ARGV[1], tonumber(ARGV[2]))
end
return 0
"
    ))
});
