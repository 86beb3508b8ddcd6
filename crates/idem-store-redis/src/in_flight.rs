//! The index of records in flight ([`idem_core::InFlightListing::list_in_flight`]).
//!
//! A record lives in the Cluster slot of its own hash tag, `{<storage id>}`, so no
//! script can update a record and a shared index in one step: an index in the record's
//! slot would need every record in one slot, which is no cluster at all. The index is
//! therefore kept beside the scripts, not inside them: 16 sorted sets,
//! `<prefix>in_flight:{0}` … `{f}` (the first hex digit of the storage id; each its
//! own hash tag, so they spread over the nodes and no single key takes every
//! request's write), scored by claim time, whose members name the claim
//! (`token \n tenant \n route \n key`).
//!
//! Most claims are completed within milliseconds, and adding them to the index only to
//! remove them again would double the commands of a new key. So a claim is first kept
//! in this process ([`Unindexed`]); a background task adds it to the index once it has
//! been held for [`INDEX_AFTER`], and a completion or a release of a claim that was
//! never indexed sends nothing. A completion or a release of an indexed claim removes
//! its member, off the request's path. A listing on this instance first indexes every
//! claim it holds; a listing elsewhere sees a claim once it has been held for
//! [`INDEX_AFTER`] (a record executing for less is not what an operator looks for).
//! A listing reads the oldest members of each set and checks each against its record:
//! a member whose token no longer holds the record (completed, released, deleted,
//! taken over, expired, or written late) is removed there and then. So the index can
//! only be briefly behind.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use idem_core::store::StoreErrorKind;
use idem_core::{FencingToken, InFlightRecord, RecordKey, StoreError};
use redis::Value;

use crate::{Inner, RedisStore, bytes, int};

/// How long a claim is held before it is written to the shared index.
pub(crate) const INDEX_AFTER: Duration = Duration::from_millis(500);

/// Claims of this process not yet in the index: token → (key, claim time, since).
pub(crate) type Unindexed = Mutex<HashMap<FencingToken, (RecordKey, u64, Instant)>>;

/// Indexes the claims held for [`INDEX_AFTER`], every half of it, until the store is
/// dropped.
pub(crate) async fn index_late_claims(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(INDEX_AFTER / 2).await;
        let Some(inner) = inner.upgrade() else { return };
        let store = RedisStore { inner };
        store.index_unindexed(Some(INDEX_AFTER)).await;
    }
}

const SHARDS: [char; 16] = [
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
];

/// Most rounds of read, check and clean per set in one listing.
const ROUNDS: usize = 8;

fn member(key: &RecordKey, token: FencingToken) -> String {
    format!("{token}\n{}\n{}\n{}", key.tenant, key.route, key.key)
}

fn parse_member(m: &[u8]) -> Option<(FencingToken, RecordKey)> {
    let text = std::str::from_utf8(m).ok()?;
    let mut parts = text.splitn(4, '\n');
    let token = parts.next()?.parse().ok()?;
    let (tenant, route, key) = (parts.next()?, parts.next()?, parts.next()?);
    Some((token, RecordKey::new(tenant, route, key)))
}

impl RedisStore {
    fn index_key(&self, storage_id: &str) -> String {
        let shard = storage_id.chars().next().unwrap_or('0');
        format!("{}in_flight:{{{shard}}}", self.inner.options.prefix)
    }

    /// Notes a claim: indexed if it is still held after [`INDEX_AFTER`].
    pub(crate) fn index_claim(&self, key: &RecordKey, token: FencingToken, at: u64) {
        self.inner
            .unindexed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token, (key.clone(), at, Instant::now()));
    }

    /// Removes a finished claim from the index, in the background; nothing to send for
    /// a claim that was never indexed.
    pub(crate) fn unindex_claim(&self, key: &RecordKey, token: FencingToken) {
        let pending = self
            .inner
            .unindexed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
        if pending.is_some() {
            return;
        }
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.index_key(&key.storage_id()))
            .arg(member(key, token));
        self.index_in_background(cmd);
    }

    /// Writes to the index the claims held at least `held` (every one for `None`).
    async fn index_unindexed(&self, held: Option<Duration>) {
        let due: Vec<_> = {
            let mut pending = self
                .inner
                .unindexed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let tokens: Vec<FencingToken> = pending
                .iter()
                .filter(|(_, (_, _, since))| held.is_none_or(|h| now.duration_since(*since) >= h))
                .map(|(t, _)| *t)
                .collect();
            tokens
                .into_iter()
                .filter_map(|t| pending.remove(&t).map(|(key, at, _)| (t, key, at)))
                .collect()
        };
        let adds = due.iter().map(|(token, key, at)| {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(self.index_key(&key.storage_id()))
                .arg(*at)
                .arg(member(key, *token));
            async move {
                if let Err(e) = self.command(&cmd).await {
                    tracing::debug!(error = %e, "in-flight index not updated; the next listing repairs it");
                }
            }
        });
        futures_util::future::join_all(adds).await;
    }

    fn index_in_background(&self, cmd: redis::Cmd) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.command(&cmd).await {
                tracing::debug!(error = %e, "in-flight index not updated; the next listing repairs it");
            }
        });
    }

    /// The live members of one set, oldest first, at most `limit`; stale ones removed.
    async fn list_shard(
        &self,
        shard: char,
        limit: usize,
    ) -> Result<Vec<InFlightRecord>, StoreError> {
        let index = format!("{}in_flight:{{{shard}}}", self.inner.options.prefix);
        let mut found = Vec::new();
        for _ in 0..ROUNDS {
            let mut range = redis::cmd("ZRANGE");
            range.arg(&index).arg(0).arg(limit.saturating_sub(1));
            let Value::Array(members) = self.command(&range).await? else {
                return Err(StoreError::msg(
                    StoreErrorKind::Corrupt,
                    "in-flight index reply",
                ));
            };
            let mut stale = Vec::new();
            found.clear();
            for m in &members {
                let raw = bytes(m).unwrap_or_default();
                match self.check(raw).await? {
                    Some(r) => found.push(r),
                    None => stale.push(raw.to_vec()),
                }
            }
            if stale.is_empty() || members.len() < limit {
                if !stale.is_empty() {
                    self.remove_members(&index, stale).await?;
                }
                break;
            }
            self.remove_members(&index, stale).await?;
        }
        Ok(found)
    }

    async fn remove_members(&self, index: &str, members: Vec<Vec<u8>>) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(index).arg(members);
        self.command(&cmd).await.map(|_| ())
    }

    /// The record a member names, if that claim still holds it.
    async fn check(&self, raw: &[u8]) -> Result<Option<InFlightRecord>, StoreError> {
        let Some((token, key)) = parse_member(raw) else {
            return Ok(None);
        };
        let (k, _) = self.key(&key);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(k).arg("t").arg("l").arg("c");
        let Value::Array(fields) = self.command(&cmd).await? else {
            return Ok(None);
        };
        let [t, l, c] = &fields[..] else {
            return Ok(None);
        };
        let holds = bytes(t)
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<FencingToken>().ok())
            == Some(token);
        Ok(match (holds, int(l), int(c)) {
            (true, Some(l), Some(c)) => Some(InFlightRecord {
                key,
                created_at: c.max(0) as u64,
                lease_expires_at: l.max(0) as u64,
            }),
            _ => None,
        })
    }

    pub(crate) async fn list(&self, limit: usize) -> Result<Vec<InFlightRecord>, StoreError> {
        let mut all = Vec::new();
        if limit == 0 {
            return Ok(all);
        }
        self.index_unindexed(None).await;
        for shard in SHARDS {
            all.extend(self.list_shard(shard, limit).await?);
        }
        all.sort_by(|a, b| (a.created_at, &a.key).cmp(&(b.created_at, &b.key)));
        all.truncate(limit);
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip_with_newlines_in_the_key() {
        let key = RecordKey::new("t_1", "POST /v1/charges", "k\nwith\nlines");
        let token = FencingToken::random();
        assert_eq!(
            parse_member(member(&key, token).as_bytes()),
            Some((token, key))
        );
        assert_eq!(parse_member(b"not a member"), None);
    }
}
