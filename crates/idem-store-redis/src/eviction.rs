//! `maxmemory-policy`: every idem key carries an expiry, so a Redis whose policy is
//! anything but `noeviction` may drop a claim or a stored outcome under memory
//! pressure, and the request then runs twice. Checked at start and in readiness.

use std::sync::atomic::{AtomicBool, Ordering};

use idem_core::StoreError;
use idem_core::store::StoreErrorKind;
use redis::Value;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};

use crate::{Conn, map_err};

/// The one policy under which Redis never drops a key before its expiry.
const SAFE: &str = "noeviction";

/// What was logged already, so that readiness probes do not repeat it.
#[derive(Default)]
pub(crate) struct Warned {
    unreadable: AtomicBool,
    allowed: AtomicBool,
    refusing: AtomicBool,
}

/// `maxmemory-policy` node by node (`(address, policy)`), or why it cannot be read
/// (`CONFIG` forbidden, as managed services often do). Connection failures are errors.
async fn policies(
    conn: &Conn,
    address: &str,
) -> Result<Result<Vec<(String, String)>, String>, StoreError> {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg("maxmemory-policy");
    let reply = match conn.clone() {
        Conn::Standalone(mut c) => cmd
            .query_async::<Value>(&mut c)
            .await
            .map(|v| vec![(Value::BulkString(address.into()), v)]),
        Conn::Cluster(mut c) => c
            .route_command(
                cmd,
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await
            .map(|v| match v {
                Value::Map(nodes) => nodes,
                other => vec![(Value::BulkString(address.into()), other)],
            }),
    };
    let nodes = match reply {
        Ok(nodes) => nodes,
        Err(e) => {
            let e = map_err(e);
            return match e.kind() {
                StoreErrorKind::Unavailable => Err(e),
                _ => Ok(Err(e.to_string())),
            };
        }
    };
    Ok(nodes
        .iter()
        .map(|(node, reply)| {
            let node = text(node).unwrap_or_else(|| address.to_owned());
            match (reply, policy(reply)) {
                (_, Some(p)) => Ok((node, p)),
                (Value::ServerError(e), None) => Err(format!("{node}: {e:?}")),
                (other, None) => Err(format!("{node}: unexpected reply {other:?}")),
            }
        })
        .collect())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// The value of a `CONFIG GET maxmemory-policy` reply: `[name, value]` (RESP2) or a
/// map (RESP3).
fn policy(reply: &Value) -> Option<String> {
    match reply {
        Value::Array(pair) => pair.get(1).and_then(text),
        Value::Map(pairs) => pairs.first().and_then(|(_, v)| text(v)),
        _ => None,
    }
}

/// Fails when some node may evict keys and `allow` is false; warns once otherwise.
pub(crate) async fn check(
    conn: &Conn,
    address: &str,
    allow: bool,
    warned: &Warned,
) -> Result<(), StoreError> {
    let nodes = match policies(conn, address).await? {
        Ok(nodes) => nodes,
        Err(why) => {
            if !warned.unreadable.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    error = %why,
                    "cannot read Redis' maxmemory-policy (CONFIG GET refused); make sure it is noeviction: \
                     under any other policy Redis may evict idem's records and a request would run twice"
                );
            }
            return Ok(());
        }
    };
    let evicting: Vec<String> = nodes
        .iter()
        .filter(|(_, p)| p != SAFE)
        .map(|(node, p)| format!("{p} on {node}"))
        .collect();
    if evicting.is_empty() {
        warned.refusing.store(false, Ordering::Relaxed);
        return Ok(());
    }
    let why = format!(
        "Redis maxmemory-policy is {}: under memory pressure Redis may evict idem's records \
         (every one carries an expiry), and a request would then run twice",
        evicting.join(", ")
    );
    if allow {
        if !warned.allowed.swap(true, Ordering::Relaxed) {
            tracing::warn!("{why}; running anyway, as allow_eviction is set");
        }
        return Ok(());
    }
    if !warned.refusing.swap(true, Ordering::Relaxed) {
        tracing::error!("{why}; refusing (not ready)");
    }
    Err(StoreError::msg(
        StoreErrorKind::Backend,
        format!(
            "{why}. Set maxmemory-policy noeviction, or accept the risk with \
             allow_eviction=true in the store URL (RedisOptions::allow_eviction)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_in_both_protocols() {
        let name = Value::BulkString(b"maxmemory-policy".to_vec());
        let value = Value::BulkString(b"allkeys-lru".to_vec());
        assert_eq!(
            policy(&Value::Array(vec![name.clone(), value.clone()])).as_deref(),
            Some("allkeys-lru")
        );
        assert_eq!(
            policy(&Value::Map(vec![(name, value)])).as_deref(),
            Some("allkeys-lru")
        );
        assert_eq!(policy(&Value::Array(vec![])), None);
    }
}
