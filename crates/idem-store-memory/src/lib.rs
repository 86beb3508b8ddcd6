//! An in-memory [`Store`] for tests and single-process services: sharded maps with
//! expiry, and wake-ups for `wait`-mode duplicates (no polling).
//!
//! Records live as long as the process; use the SQLite store for durability. Expired
//! records are swept as the store is used: every 256th claim purges one shard, so
//! memory stays bounded without a background task.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use idem_core::record::{after, now_millis};
use idem_core::store::{Notifier, Watch};
use idem_core::{
    Admission, Claim, ClaimSpec, FencingToken, InFlightListing, InFlightRecord, Lease, Record,
    RecordKey, RecordState, Store, StoreError, StoredResponse, TenantCounting, TenantLimits,
    Wakeups,
};

/// The in-memory store.
#[derive(Debug)]
pub struct MemoryStore {
    hasher: std::hash::RandomState,
    shards: Box<[Mutex<HashMap<RecordKey, Record>>]>,
    /// Per-tenant counts for [`TenantCounting::admit`], sharded by tenant.
    tenants: Box<[Mutex<HashMap<String, TenantSlots>>]>,
    notifier: Notifier,
    claims: std::sync::atomic::AtomicUsize,
    /// Records in flight by (creation time, key), for [`InFlightListing::list_in_flight`]. Taken
    /// only after a shard lock, never before one. Entries left by records that expired
    /// in flight are dropped by the next listing.
    in_flight: Mutex<BTreeSet<(u64, RecordKey)>>,
}

/// (route, key): a record within its tenant.
type Member = (String, String);

/// One tenant's counted records, each with the time its slot expires.
#[derive(Debug, Default)]
struct TenantSlots {
    in_flight: Slots,
    records: Slots,
}

#[derive(Debug, Default)]
struct Slots {
    members: HashMap<Member, u64>,
    /// No slot expires before this: pruning is skipped until then.
    earliest: u64,
}

impl Slots {
    fn prune(&mut self, now: u64) {
        if now >= self.earliest {
            self.members.retain(|_, e| *e > now);
            self.earliest = self.members.values().copied().min().unwrap_or(u64::MAX);
        }
    }

    /// Whether `id` may take (or keep) a slot under `limit`.
    fn has_room(&mut self, id: &Member, limit: Option<u64>, now: u64) -> bool {
        let Some(limit) = limit else { return true };
        if self.members.get(id).is_some_and(|&e| e > now) {
            return true;
        }
        if self.members.len() as u64 >= limit {
            self.prune(now);
        }
        (self.members.len() as u64) < limit
    }

    fn put(&mut self, id: &Member, until: u64) {
        self.earliest = self.earliest.min(until);
        match self.members.get_mut(id) {
            Some(e) => *e = until,
            None => {
                self.members.insert(id.clone(), until);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// One shard is swept every this many claims.
const SWEEP_EVERY: usize = 256;

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with one shard per 4 hardware threads, at least 16.
    pub fn new() -> Self {
        let n = std::thread::available_parallelism().map_or(16, |n| (n.get() * 4).max(16));
        MemoryStore {
            hasher: std::hash::RandomState::new(),
            shards: (0..n).map(|_| Mutex::default()).collect(),
            tenants: (0..n).map(|_| Mutex::default()).collect(),
            notifier: Notifier::default(),
            claims: std::sync::atomic::AtomicUsize::new(0),
            in_flight: Mutex::default(),
        }
    }

    /// Number of records held, expired ones included until purged.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn tenant_shard(&self, tenant: &str) -> MutexGuard<'_, HashMap<String, TenantSlots>> {
        let i = self.hasher.hash_one(tenant) as usize % self.tenants.len();
        lock(&self.tenants[i])
    }

    fn sweep_tenants(map: &mut HashMap<String, TenantSlots>, now: u64) {
        map.retain(|_, t| {
            t.in_flight.prune(now);
            t.records.prune(now);
            !(t.in_flight.is_empty() && t.records.is_empty())
        });
    }

    fn shard(&self, key: &RecordKey) -> MutexGuard<'_, HashMap<RecordKey, Record>> {
        let i = self.hasher.hash_one(key) as usize % self.shards.len();
        lock(&self.shards[i])
    }

    /// Forgets the in-flight index entry of `record` (held under its shard's lock).
    fn unindex(&self, key: &RecordKey, record: Option<&Record>) {
        if let Some(r) = record {
            lock(&self.in_flight).remove(&(r.created_at, key.clone()));
        }
    }

    /// The in-flight record a listing saw in the index, if it is still live and in
    /// flight from that same claim.
    fn live_in_flight(&self, created_at: u64, key: &RecordKey, now: u64) -> Option<InFlightRecord> {
        let shard = self.shard(key);
        let r = shard
            .get(key)
            .filter(|r| r.expires_at > now && r.created_at == created_at)?;
        match r.state {
            RecordState::InFlight {
                lease_expires_at, ..
            } => Some(InFlightRecord {
                key: key.clone(),
                created_at,
                lease_expires_at,
            }),
            RecordState::Completed(_) => None,
        }
    }

    /// Applies `f` to the live in-flight record held by `token`.
    fn with_holder(
        &self,
        key: &RecordKey,
        token: FencingToken,
        f: impl FnOnce(&mut HashMap<RecordKey, Record>, u64),
    ) -> bool {
        let now = now_millis();
        let mut shard = self.shard(key);
        let held = matches!(
            shard.get(key),
            Some(r) if r.expires_at > now && matches!(r.state, RecordState::InFlight { token: t, .. } if t == token)
        );
        if held {
            f(&mut shard, now);
        }
        held
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard cannot leave a record half-written: every update
    // is a single insert or remove.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store for MemoryStore {
    async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
        let now = now_millis();
        let n = self
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(SWEEP_EVERY) {
            let i = (n / SWEEP_EVERY) % self.shards.len();
            lock(&self.shards[i]).retain(|_, r| r.expires_at > now);
            Self::sweep_tenants(&mut lock(&self.tenants[i]), now);
        }
        let mut shard = self.shard(key);
        if let Some(r) = shard.get(key)
            && r.expires_at > now
        {
            return Ok(Claim::Existing(r.clone()));
        }
        let lease = Lease {
            token: FencingToken::random(),
            expires_at: after(now, spec.lease),
        };
        shard.insert(
            key.clone(),
            Record {
                fingerprint: spec.fingerprint.clone(),
                state: RecordState::InFlight {
                    token: lease.token,
                    lease_expires_at: lease.expires_at,
                },
                created_at: now,
                expires_at: after(now, spec.ttl.max(spec.lease)),
            },
        );
        lock(&self.in_flight).insert((now, key.clone()));
        Ok(Claim::Acquired(lease))
    }

    async fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Option<Lease>, StoreError> {
        let now = now_millis();
        let mut shard = self.shard(key);
        let Some(r) = shard.get_mut(key) else {
            return Ok(None);
        };
        match r.state {
            RecordState::InFlight {
                token,
                lease_expires_at,
            } if token == stale && lease_expires_at <= now && r.expires_at > now => {
                let lease = Lease {
                    token: FencingToken::random(),
                    expires_at: after(now, spec.lease),
                };
                r.fingerprint = spec.fingerprint.clone();
                r.state = RecordState::InFlight {
                    token: lease.token,
                    lease_expires_at: lease.expires_at,
                };
                r.expires_at = after(now, spec.ttl.max(spec.lease));
                drop(shard);
                self.notifier.notify(key);
                Ok(Some(lease))
            }
            _ => Ok(None),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = self.with_holder(key, token, |shard, now| {
            self.unindex(key, shard.get(key));
            if let Some(r) = shard.get_mut(key) {
                r.state = RecordState::Completed(response.clone());
                r.expires_at = after(now, ttl);
            }
        });
        if done {
            self.notifier.notify(key);
        }
        Ok(done)
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<bool, StoreError> {
        let done = self.with_holder(key, token, |shard, _| {
            self.unindex(key, shard.remove(key).as_ref());
        });
        if done {
            self.notifier.notify(key);
        }
        Ok(done)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.with_holder(key, token, |shard, now| {
            if let Some(r) = shard.get_mut(key) {
                let lease_expires_at = after(now, lease);
                r.state = RecordState::InFlight {
                    token,
                    lease_expires_at,
                };
                // Never expire under a live lease (SPEC §5).
                r.expires_at = r.expires_at.max(lease_expires_at);
            }
        }))
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let now = now_millis();
        Ok(self
            .shard(key)
            .get(key)
            .filter(|r| r.expires_at > now)
            .cloned())
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let removed = {
            let mut shard = self.shard(key);
            let record = shard.remove(key);
            self.unindex(key, record.as_ref());
            record.is_some()
        };
        if removed {
            self.notifier.notify(key);
        }
        Ok(removed)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = now_millis();
        let mut purged = 0;
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            let before = map.len();
            map.retain(|_, r| r.expires_at > now);
            purged += (before - map.len()) as u64;
        }
        for shard in self.tenants.iter() {
            Self::sweep_tenants(&mut lock(shard), now);
        }
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl TenantCounting for MemoryStore {
    async fn admit(
        &self,
        key: &RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Admission, StoreError> {
        let now = now_millis();
        let id = (key.route.clone(), key.key.clone());
        let mut shard = self.tenant_shard(&key.tenant);
        let slots = shard.entry(key.tenant.clone()).or_default();
        if !slots.in_flight.has_room(&id, limits.max_in_flight, now) {
            return Ok(Admission::InFlightFull);
        }
        if !slots.records.has_room(&id, limits.max_records, now) {
            return Ok(Admission::RecordsFull);
        }
        if limits.max_in_flight.is_some() {
            slots.in_flight.put(&id, after(now, lease));
        }
        if limits.max_records.is_some() {
            slots.records.put(&id, after(now, ttl));
        }
        Ok(Admission::Admitted)
    }

    async fn settle(&self, key: &RecordKey, kept: Option<Duration>) -> Result<(), StoreError> {
        let id = (key.route.clone(), key.key.clone());
        let mut shard = self.tenant_shard(&key.tenant);
        let Some(slots) = shard.get_mut(&key.tenant) else {
            return Ok(());
        };
        slots.in_flight.members.remove(&id);
        match kept {
            Some(ttl) if slots.records.members.contains_key(&id) => {
                slots.records.put(&id, after(now_millis(), ttl));
            }
            Some(_) => {}
            None => {
                slots.records.members.remove(&id);
            }
        }
        if slots.in_flight.is_empty() && slots.records.is_empty() {
            shard.remove(&key.tenant);
        }
        Ok(())
    }
}

impl Wakeups for MemoryStore {
    async fn watch(&self, key: &RecordKey) -> Result<Watch, StoreError> {
        Ok(self.notifier.subscribe(key))
    }
}

impl InFlightListing for MemoryStore {
    async fn list_in_flight(&self, limit: usize) -> Result<Vec<InFlightRecord>, StoreError> {
        let now = now_millis();
        let mut found = Vec::new();
        let mut after: Option<(u64, RecordKey)> = None;
        // Index entries are copied out in pages and checked against their shards
        // without the index lock held (shard locks come first everywhere else).
        while found.len() < limit {
            let page: Vec<(u64, RecordKey)> = {
                let index = lock(&self.in_flight);
                let range = match &after {
                    Some(a) => index.range((
                        std::ops::Bound::Excluded(a.clone()),
                        std::ops::Bound::Unbounded,
                    )),
                    None => index.range(..),
                };
                range.take(limit.max(16)).cloned().collect()
            };
            let Some(last) = page.last().cloned() else {
                break;
            };
            let mut stale = Vec::new();
            for (created_at, key) in page {
                match self.live_in_flight(created_at, &key, now) {
                    Some(r) if found.len() < limit => found.push(r),
                    Some(_) => {}
                    None => stale.push((created_at, key)),
                }
            }
            let mut index = lock(&self.in_flight);
            for entry in &stale {
                index.remove(entry);
            }
            after = Some(last);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_sweep_expired_records() {
        let store = MemoryStore::new();
        let fp = idem_core::Fingerprint {
            version: 1,
            digest: vec![1; 32],
        };
        let short = ClaimSpec {
            fingerprint: &fp,
            lease: Duration::from_millis(100),
            ttl: Duration::from_millis(100),
        };
        for i in 0..100 {
            store
                .claim(&RecordKey::new("t", "r", format!("old{i}")), short)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let long = ClaimSpec {
            ttl: Duration::from_secs(60),
            lease: Duration::from_secs(60),
            ..short
        };
        for i in 0..SWEEP_EVERY * store.shards.len() {
            store
                .claim(&RecordKey::new("t", "r", format!("new{i}")), long)
                .await
                .unwrap();
        }
        assert_eq!(
            store.len(),
            SWEEP_EVERY * store.shards.len(),
            "every expired record was swept"
        );
    }

    idem_conformance::conformance_tests!(async {
        Some(std::sync::Arc::new(crate::MemoryStore::new()))
    });
}
