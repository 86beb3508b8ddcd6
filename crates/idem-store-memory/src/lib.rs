//! An in-memory [`Store`] for tests and single-process services: sharded maps with
//! expiry, and wake-ups for `wait`-mode duplicates (no polling).
//!
//! Records live as long as the process; use the SQLite store for durability. Expired
//! records are swept as the store is used: every 256th claim purges one shard (once
//! one of its records has expired), so memory stays bounded without a background task.

use std::collections::{BTreeMap, HashMap, btree_map};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::{HashTable, hash_table};

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
    /// Keyed (SipHash, random keys): the keys come from callers. A key is hashed once
    /// per operation; the hash picks the shard and finds the record in it.
    hasher: std::hash::RandomState,
    shards: Box<[Mutex<Shard>]>,
    /// Per-tenant counts for [`TenantCounting::admit`], sharded by tenant.
    tenants: Box<[Mutex<HashMap<String, TenantSlots>>]>,
    notifier: Notifier,
    claims: std::sync::atomic::AtomicUsize,
}

/// One shard: its records, and an index of those in flight for
/// [`InFlightListing::list_in_flight`], kept under the same lock.
struct Shard {
    /// Each record boxed, with its key's hash: growing the table (which holds the
    /// shard's lock meanwhile) moves 16 bytes per record and hashes no key again, where
    /// records inline moved 200+ bytes each and hashed every key with SipHash; and an
    /// empty slot of the table costs 16 bytes.
    records: HashTable<Slot>,
    /// No record expires before this: a sweep before then has nothing to drop.
    next_expiry: u64,
    /// (creation time, key hash) of each record in flight, with how many records share
    /// them (hashes may collide): no key is copied into the index. Entries left by
    /// records that expired in flight are dropped by the next sweep or listing.
    in_flight: BTreeMap<(u64, u64), u32>,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            records: HashTable::new(),
            next_expiry: u64::MAX,
            in_flight: BTreeMap::new(),
        }
    }
}

/// A record in a shard's table.
struct Slot {
    hash: u64,
    entry: Box<(RecordKey, Record)>,
}

impl Slot {
    fn key(&self) -> &RecordKey {
        &self.entry.0
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("records", &self.records.len())
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl Shard {
    fn get(&self, hash: u64, key: &RecordKey) -> Option<&Record> {
        self.records
            .find(hash, |s| s.key() == key)
            .map(|s| &s.entry.1)
    }

    /// The record of `key`, to change in place; a change of its `expires_at` must be
    /// told to [`Shard::expires`].
    fn get_mut(&mut self, hash: u64, key: &RecordKey) -> Option<&mut Record> {
        self.records
            .find_mut(hash, |s| s.key() == key)
            .map(|s| &mut s.entry.1)
    }

    /// A record of this shard now expires at `at`.
    fn expires(&mut self, at: u64) {
        self.next_expiry = self.next_expiry.min(at);
    }

    /// Inserts or replaces the record of `key`, indexing it if it is in flight.
    fn put(&mut self, hash: u64, key: &RecordKey, record: Record) {
        if is_in_flight(&record) {
            self.index(record.created_at, hash);
        }
        self.expires(record.expires_at);
        // One probe of the table finds the record or the place for it.
        let replaced = match self.records.entry(hash, |s| s.key() == key, |s| s.hash) {
            hash_table::Entry::Occupied(mut slot) => {
                Some(std::mem::replace(&mut slot.get_mut().entry.1, record))
            }
            hash_table::Entry::Vacant(place) => {
                let entry = Box::new((key.clone(), record));
                place.insert(Slot { hash, entry });
                None
            }
        };
        if let Some(old) = replaced {
            self.unindex(hash, &old);
        }
    }

    fn remove(&mut self, hash: u64, key: &RecordKey) -> Option<Record> {
        let (slot, _) = self
            .records
            .find_entry(hash, |s| s.key() == key)
            .ok()?
            .remove();
        let (_, record) = *slot.entry;
        self.unindex(hash, &record);
        Some(record)
    }

    fn index(&mut self, created_at: u64, hash: u64) {
        *self.in_flight.entry((created_at, hash)).or_default() += 1;
    }

    /// Forgets the index entry of `record` if it was in flight.
    fn unindex(&mut self, hash: u64, record: &Record) {
        if is_in_flight(record) {
            self.unindex_at(record.created_at, hash);
        }
    }

    fn unindex_at(&mut self, created_at: u64, hash: u64) {
        unindex(&mut self.in_flight, created_at, hash);
    }

    /// Drops the records that expired (and their index entries); returns how many.
    /// Walks the shard only once its earliest expiry has passed.
    fn sweep(&mut self, now: u64) -> usize {
        if now < self.next_expiry {
            return 0;
        }
        let before = self.records.len();
        let in_flight = &mut self.in_flight;
        let mut next_expiry = u64::MAX;
        self.records.retain(|s| {
            let r = &s.entry.1;
            let live = r.expires_at > now;
            if live {
                next_expiry = next_expiry.min(r.expires_at);
            } else if is_in_flight(r) {
                unindex(in_flight, r.created_at, s.hash);
            }
            live
        });
        self.next_expiry = next_expiry;
        before - self.records.len()
    }

    /// Up to `limit` live records in flight, oldest first; drops index entries that
    /// no longer match one.
    fn list_in_flight(&mut self, limit: usize, now: u64) -> Vec<InFlightRecord> {
        let mut found = Vec::new();
        let mut stale = Vec::new();
        for &(created_at, hash) in self.in_flight.keys() {
            if found.len() >= limit {
                break;
            }
            let before = found.len();
            for (key, r) in self
                .records
                .iter_hash(hash)
                .map(|s| (&s.entry.0, &s.entry.1))
            {
                if let RecordState::InFlight {
                    lease_expires_at, ..
                } = r.state
                    && r.created_at == created_at
                    && r.expires_at > now
                {
                    found.push(InFlightRecord {
                        key: key.clone(),
                        created_at,
                        lease_expires_at,
                    });
                }
            }
            if found.len() == before {
                stale.push((created_at, hash));
            }
        }
        for entry in stale {
            self.in_flight.remove(&entry);
        }
        found
    }
}

/// Takes one record off an in-flight index.
fn unindex(index: &mut BTreeMap<(u64, u64), u32>, created_at: u64, hash: u64) {
    if let btree_map::Entry::Occupied(mut e) = index.entry((created_at, hash)) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

fn is_in_flight(record: &Record) -> bool {
    matches!(record.state, RecordState::InFlight { .. })
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
        }
    }

    /// Number of records held, expired ones included until purged.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).records.len()).sum()
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

    /// The key's hash and its shard, locked. The shard is picked with the hash's upper
    /// half: the table in the shard places records by its lower bits.
    fn shard(&self, key: &RecordKey) -> (u64, MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(key);
        let i = (hash >> 32) as usize % self.shards.len();
        (hash, lock(&self.shards[i]))
    }

    /// Applies `f` to the live in-flight record held by `token`.
    fn with_holder(
        &self,
        key: &RecordKey,
        token: FencingToken,
        f: impl FnOnce(&mut Shard, u64, u64),
    ) -> bool {
        let now = now_millis();
        let (hash, mut shard) = self.shard(key);
        let held = matches!(
            shard.get(hash, key),
            Some(r) if r.expires_at > now && matches!(r.state, RecordState::InFlight { token: t, .. } if t == token)
        );
        if held {
            f(&mut shard, hash, now);
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
            lock(&self.shards[i]).sweep(now);
            Self::sweep_tenants(&mut lock(&self.tenants[i]), now);
        }
        let (hash, mut shard) = self.shard(key);
        if let Some(r) = shard.get(hash, key)
            && r.expires_at > now
        {
            return Ok(Claim::Existing(r.clone()));
        }
        let lease = Lease {
            token: FencingToken::random(),
            expires_at: after(now, spec.lease),
        };
        let record = Record {
            fingerprint: spec.fingerprint.clone(),
            state: RecordState::InFlight {
                token: lease.token,
                lease_expires_at: lease.expires_at,
            },
            created_at: now,
            expires_at: after(now, spec.ttl.max(spec.lease)),
        };
        shard.put(hash, key, record);
        Ok(Claim::Acquired(lease))
    }

    async fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Option<Lease>, StoreError> {
        let now = now_millis();
        let (hash, mut shard) = self.shard(key);
        let Some(r) = shard.get_mut(hash, key) else {
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
                let expires_at = r.expires_at;
                shard.expires(expires_at);
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
        let done = self.with_holder(key, token, |shard, hash, now| {
            if let Some(r) = shard.get_mut(hash, key) {
                r.state = RecordState::Completed(response.clone());
                r.expires_at = after(now, ttl);
                let (created_at, expires_at) = (r.created_at, r.expires_at);
                shard.unindex_at(created_at, hash);
                shard.expires(expires_at);
            }
        });
        if done {
            self.notifier.notify(key);
        }
        Ok(done)
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<bool, StoreError> {
        let done = self.with_holder(key, token, |shard, hash, _| {
            shard.remove(hash, key);
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
        Ok(self.with_holder(key, token, |shard, hash, now| {
            if let Some(r) = shard.get_mut(hash, key) {
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
        let (hash, shard) = self.shard(key);
        Ok(shard.get(hash, key).filter(|r| r.expires_at > now).cloned())
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let removed = {
            let (hash, mut shard) = self.shard(key);
            shard.remove(hash, key).is_some()
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
            purged += lock(shard).sweep(now) as u64;
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
        // Each shard's oldest, then the oldest of those.
        let mut found: Vec<InFlightRecord> = Vec::new();
        for shard in self.shards.iter() {
            found.extend(lock(shard).list_in_flight(limit, now));
        }
        found.sort_by_key(|r| r.created_at);
        found.truncate(limit);
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

    #[tokio::test]
    async fn a_record_kept_for_less_than_its_claim_said_is_swept_when_that_ends() {
        // The claim says 60 s, the outcome is kept for 50 ms: the shard's earliest
        // expiry must follow, or sweeps would skip the shard for a minute.
        let store = MemoryStore::new();
        let fp = idem_conformance::fp("short-kept");
        let key = idem_conformance::fresh_key("short-kept");
        let spec = idem_conformance::spec(&fp, 60_000, 60_000);
        let Claim::Acquired(lease) = store.claim(&key, spec).await.unwrap() else {
            panic!("a new key is acquired");
        };
        let response = StoredResponse::new(
            201,
            Vec::new(),
            idem_core::Recorded::Whole(bytes::Bytes::from_static(b"{}")),
            None,
        );
        assert!(
            store
                .complete(&key, lease.token, &response, Duration::from_millis(50))
                .await
                .unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.purge_expired().await.unwrap(), 1);
        assert!(store.is_empty());
    }

    idem_conformance::conformance_tests!(async {
        Some(std::sync::Arc::new(crate::MemoryStore::new()))
    });
}
