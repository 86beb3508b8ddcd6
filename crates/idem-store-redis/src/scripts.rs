//! The Lua scripts: each state change is one script, atomic on the server, judged by
//! the server's clock. A record is a hash with fields `f` (fingerprint), `t` (token,
//! while in flight), `l` (lease end, ms), `r` (stored response, once completed),
//! `c` (created, ms), `e` (expiry, ms) and `k` (the token that completed it); the key
//! also carries a native expiry at `e`.
//!
//! A Redis Cluster connection retries a command whose answer it did not get, so a
//! script may run twice with the same arguments. Tokens are made by the client and
//! passed in ARGV, so a re-sent script recognises its own first run and answers as it
//! did: see CLAIM, RECLAIM, COMPLETE and RELEASE (which leaves a short-lived tombstone
//! naming its token and call for this, since the record it deleted cannot tell).
//! RENEW, ADMIT, SETTLE, GET and DELETE are idempotent as they are.

use std::sync::LazyLock;

use redis::Script;

/// Server time in ms, integer formatting that never goes through `%g`, and the
/// change message of a record, on its channel: an empty channel is the store's
/// notifications turned off (`RedisOptions::notify`), and nothing is published.
const PRELUDE: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function s(n) return string.format('%d', n) end
local function publish(channel)
  if channel ~= '' then redis.call('PUBLISH', channel, '') end
end
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
-- A re-sent claim (a Cluster retry of one whose answer was lost) finds the record in
-- flight with its own token: acquired, with the lease the first run set.
if h and h[2] == ARGV[2] then return {1, h[3]} end
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
-- A re-sent reclaim finds the record held by its own new token: the same answer.
if held_by(ARGV[2]) then return redis.call('HGET', KEYS[1], 'l') end
if not held_by(ARGV[1]) then return nil end
local l = tonumber(redis.call('HGET', KEYS[1], 'l'))
if l > now then return nil end
local lease = now + tonumber(ARGV[4])
local exp = now + math.max(tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 't', ARGV[2], 'f', ARGV[3], 'l', s(lease), 'e', s(exp))
redis.call('PEXPIREAT', KEYS[1], s(exp))
publish(ARGV[6])
return s(lease)
",
    )
});

/// ARGV: token, encoded response, ttl ms, channel. Returns 1 when stored, or when this
/// very response was stored already by the same token: a re-sent complete (a Cluster
/// retry of one whose answer was lost) must not look fenced, while another complete of
/// a completed record is still refused. `k` keeps the completing token.
pub(crate) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if not held_by(ARGV[1]) then
  local h = redis.call('HMGET', KEYS[1], 'k', 'e', 'r')
  if h[1] == ARGV[1] and h[2] and tonumber(h[2]) > now and h[3] == ARGV[2] then return 1 end
  return 0
end
local exp = now + tonumber(ARGV[3])
redis.call('HDEL', KEYS[1], 't', 'l')
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'e', s(exp), 'k', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], s(exp))
publish(ARGV[4])
return 1
",
    )
});

/// KEYS: record, tombstone (this token's, in the record's slot). ARGV: token, channel,
/// tombstone life ms, call id (fresh per `release` call). Returns 1 when the in-flight
/// record held by the token was deleted; the tombstone then keeps the call id for its
/// life. A re-sent release (a Cluster retry of one whose answer was lost) finds the
/// record gone, or claimed anew by another token, which it leaves alone, but finds its
/// own call id and answers 1 as the first run did, so the engine settles the tenant's
/// slots rather than logging a lost lease. Any other release, by another token or a
/// second call by the same one, answers 0. A claim neither reads nor clears
/// tombstones: they are other keys and expire on their own.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if not held_by(ARGV[1]) then
  if redis.call('GET', KEYS[2]) == ARGV[4] then return 1 end
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
publish(ARGV[2])
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
if n == 1 then publish(ARGV[1]) end
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

/// Every script sent twice with the same arguments, as a Cluster retry (`retries(2)`)
/// re-sends one whose answer was lost after it ran: the answers and the record stay
/// those of a single run.
#[cfg(test)]
mod resend_tests {
    use std::time::Duration;

    use idem_core::{
        Claim, ClaimSpec, FencingToken, Fingerprint, RecordKey, RecordState, Store, StoredResponse,
    };
    use redis::Value;

    use super::*;
    use crate::{RedisStore, ms};

    const SECOND: Duration = Duration::from_secs(1);

    async fn store(var: &str, default: &str, case: &str) -> Option<RedisStore> {
        let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
        match RedisStore::connect(&url).await {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("no Redis at {url}: {e}");
                idem_conformance::skip(case);
                None
            }
        }
    }

    async fn twice(s: &RedisStore, script: &Script, keys: &[&str], args: &[&[u8]]) -> [Value; 2] {
        [
            s.eval(script, keys, args).await.unwrap(),
            s.eval(script, keys, args).await.unwrap(),
        ]
    }

    fn fingerprint() -> Fingerprint {
        Fingerprint {
            version: 1,
            digest: vec![7; 32],
        }
    }

    /// CLAIM twice with one token: both answers "acquired" with the same lease.
    async fn claim_twice(s: &RedisStore, key: &RecordKey, token: FencingToken, lease: Duration) {
        let (k, _) = s.key(key);
        let (fp, t) = (fingerprint().encode(), token.to_string());
        let args: [&[u8]; 4] = [fp.as_bytes(), t.as_bytes(), &ms(lease), &ms(SECOND * 60)];
        let [first, again] = twice(s, &CLAIM, &[&k], &args).await;
        assert!(
            matches!(&first, Value::Array(a) if a.first() == Some(&Value::Int(1))),
            "the first claim is acquired: {first:?}"
        );
        assert_eq!(
            again, first,
            "a re-sent claim is acquired with the same lease"
        );
    }

    async fn claim_reclaim_complete(s: &RedisStore) {
        let key = RecordKey::new("t_resend", "POST /v1/charges", uuid());
        let (k, ch) = s.key(&key);
        let stale = FencingToken::random();
        claim_twice(s, &key, stale, Duration::from_millis(1)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;

        let (fresh, fp) = (FencingToken::random(), fingerprint().encode());
        let (st, ft) = (stale.to_string(), fresh.to_string());
        let args: [&[u8]; 6] = [
            st.as_bytes(),
            ft.as_bytes(),
            fp.as_bytes(),
            &ms(SECOND * 30),
            &ms(SECOND * 60),
            ch.as_bytes(),
        ];
        let [first, again] = twice(s, &RECLAIM, &[&k], &args).await;
        assert_ne!(first, Value::Nil, "the first reclaim takes over");
        assert_eq!(again, first, "a re-sent reclaim answers the same lease");
        assert!(
            matches!(s.get(&key).await.unwrap().unwrap().state,
                RecordState::InFlight { token, .. } if token == fresh),
            "held by the reclaiming token"
        );

        let response = StoredResponse {
            status: 201,
            headers: vec![],
            body: "charged".into(),
            body_kept: idem_core::BodyKept::Whole,
            request_id: None,
        };
        for attempt in ["first", "re-sent"] {
            assert!(
                s.complete(&key, fresh, &response, SECOND * 60)
                    .await
                    .unwrap(),
                "the {attempt} complete is stored, not fenced"
            );
        }
        let stored = s.get(&key).await.unwrap().unwrap();
        assert!(matches!(stored.state, RecordState::Completed(ref r) if r.body == "charged"));
        assert!(
            !s.complete(&key, stale, &response, SECOND * 60)
                .await
                .unwrap(),
            "another token is still fenced"
        );
        let other = StoredResponse {
            body: "other".into(),
            ..response
        };
        assert!(
            !s.complete(&key, fresh, &other, SECOND * 60).await.unwrap(),
            "a completed record is not completed again, even by its own token"
        );
        assert!(
            !s.release(&key, fresh).await.unwrap(),
            "a completed record is not released"
        );
    }

    /// RELEASE: the first deletes the record, a re-sent one finds its call's tombstone
    /// and answers 1 as well (so the engine settles the tenant's slots); the tombstone
    /// expires, the key is free, and a stranger's release or a second call by the same
    /// token is still refused.
    async fn release_twice(s: &RedisStore) {
        let key = RecordKey::new("t_resend", "POST /v1/charges", uuid());
        let token = FencingToken::random();
        claim_twice(s, &key, token, SECOND * 30).await;
        let ([k, tombstone], args) = s.release_invocation(&key, token, FencingToken::random());
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let [first, again] = twice(s, &RELEASE, &[&k, &tombstone], &args).await;
        assert_eq!((first, again), (Value::Int(1), Value::Int(1)));
        let left = s.command(redis::cmd("PTTL").arg(&tombstone)).await.unwrap();
        let life = s.tombstone_life().as_millis() as i64;
        assert!(
            matches!(left, Value::Int(ms) if ms > 0 && ms <= life),
            "the tombstone expires within its life: {left:?}"
        );
        for (who, t) in [
            ("a stranger", FencingToken::random()),
            ("the same token", token),
        ] {
            assert!(
                !s.release(&key, t).await.unwrap(),
                "a new release by {who} after a release is refused"
            );
        }
        let spec = ClaimSpec {
            fingerprint: &fingerprint(),
            lease: SECOND,
            ttl: SECOND * 60,
        };
        assert!(matches!(
            s.claim(&key, spec).await.unwrap(),
            Claim::Acquired(_)
        ));
    }

    fn uuid() -> String {
        format!("resend-{}", FencingToken::random())
    }

    #[tokio::test]
    async fn re_sent_scripts_answer_as_once_standalone() {
        let case = "re_sent_scripts_answer_as_once_standalone";
        if let Some(s) = store("IDEM_REDIS_URL", "redis://127.0.0.1:6379", case).await {
            claim_reclaim_complete(&s).await;
            release_twice(&s).await;
        }
    }

    #[tokio::test]
    async fn re_sent_scripts_answer_as_once_cluster() {
        let case = "re_sent_scripts_answer_as_once_cluster";
        let nodes = "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002";
        if let Some(s) = store("IDEM_REDIS_CLUSTER", nodes, case).await {
            claim_reclaim_complete(&s).await;
            release_twice(&s).await;
        }
    }
}
