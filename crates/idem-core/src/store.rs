//! The `Store` trait: small, atomic operations. Stores store; the engine decides.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::fingerprint::Fingerprint;
use crate::record::{FencingToken, Lease, Record, StoredResponse, UnixMillis};
use crate::scope::RecordKey;

/// A boxed, sendable future (for [`DynStore`]).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resolves when the watched record may have changed (completed, released, deleted), or
/// when the store cannot tell any more (the caller then re-reads the record).
pub type Watch = BoxFuture<'static, ()>;

/// The kind of a store failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store cannot be reached or timed out: worth retrying later.
    Unavailable,
    /// The store answered with data it cannot read.
    Corrupt,
    /// Any other failure of the backend.
    Backend,
}

/// A store failure, with its source kept.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} store error: {message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// A new error of a kind, with its cause.
    pub fn new(
        kind: StoreErrorKind,
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A new error with no underlying cause.
    pub fn msg(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        StoreError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// What kind of failure this is (which says whether a retry may help, and
    /// whether the record is known to exist).
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No live record existed (or it had expired): the caller holds the key.
    Acquired(Lease),
    /// A live record exists; the engine decides what it means.
    Existing(Record),
}

/// The settings of one claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimSpec<'a> {
    /// Fingerprint of the claiming request, stored with the record.
    pub fingerprint: &'a Fingerprint,
    /// Lease length.
    pub lease: Duration,
    /// Retention: the record expires this long after the claim, or after completion.
    pub ttl: Duration,
}

/// Per-tenant caps, checked when a request takes a new record (see [`Store::admit`]).
/// `None` is no cap. They bound what one caller can make idem hold: a tenant that
/// floods new keys gets `429 tenant-limit-reached` instead of filling the store or
/// running unbounded work upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantLimits {
    /// Most records of one tenant executing at once (in flight, lease alive).
    pub max_in_flight: Option<u64>,
    /// Most live records (in flight or completed, not yet expired) of one tenant.
    pub max_records: Option<u64>,
}

impl TenantLimits {
    /// No cap.
    pub const NONE: TenantLimits = TenantLimits {
        max_in_flight: None,
        max_records: None,
    };

    /// Caps on records in flight and on live records.
    pub fn new(max_in_flight: Option<u64>, max_records: Option<u64>) -> Self {
        TenantLimits {
            max_in_flight,
            max_records,
        }
    }

    /// Whether no cap is set.
    pub fn is_unlimited(&self) -> bool {
        self.max_in_flight.is_none() && self.max_records.is_none()
    }
}

/// The answer to [`Store::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Counted (or already counted): the record may execute.
    Admitted,
    /// The tenant already has `max_in_flight` records in flight.
    InFlightFull,
    /// The tenant already holds `max_records` live records.
    RecordsFull,
}

/// A record in flight, as [`Store::list_in_flight`] lists it: which key, since when,
/// and until when its holder's lease runs. A lease in the past means the executor
/// died or hung (abandoned): the record waits for a retry to take it over, or expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightRecord {
    /// The record's key.
    pub key: RecordKey,
    /// When the key was first claimed.
    pub created_at: UnixMillis,
    /// When the current holder's lease ends unless renewed.
    pub lease_expires_at: UnixMillis,
}

fn in_flight_unsupported() -> StoreError {
    StoreError::msg(
        StoreErrorKind::Backend,
        "this store cannot list the records in flight",
    )
}

fn tenant_limits_unsupported() -> StoreError {
    StoreError::msg(
        StoreErrorKind::Backend,
        "this store does not count records per tenant (tenant limits)",
    )
}

/// Storage of idempotency records. Every operation is atomic on its own; none is a
/// read followed by a write.
///
/// Times are judged by the store's own clock, so that instances sharing a store with
/// skewed clocks still agree.
pub trait Store: Send + Sync + 'static {
    /// Creates an in-flight record for `key` unless a live (unexpired) record exists,
    /// in one atomic step. An expired record is replaced.
    fn claim(
        &self,
        key: &RecordKey,
        spec: ClaimSpec<'_>,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Takes over an abandoned execution: succeeds only if the record is still in flight
    /// with token `stale` and its lease has ended. The new claim keeps the original
    /// creation time and gets a new token, fingerprint, lease and expiry.
    fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> impl Future<Output = Result<Option<Lease>, StoreError>> + Send;

    /// Stores the outcome, if `token` still holds the key. Returns false otherwise.
    /// The record then expires `ttl` after now.
    fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the in-flight record, if `token` still holds the key.
    fn release(
        &self,
        key: &RecordKey,
        token: FencingToken,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Extends the lease to now + `lease`, if `token` still holds the key.
    fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Reads a live record.
    fn get(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Deletes a record whatever its state (administration).
    fn delete(&self, key: &RecordKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Removes expired records; returns how many.
    fn purge_expired(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Starts watching a record. The returned future resolves at its next change
    /// (complete, release, delete, reclaim); subscribe *before* re-reading the record
    /// so that no change is missed. The default polls every 25 ms; stores that can
    /// notify override it.
    fn watch(&self, key: &RecordKey) -> impl Future<Output = Result<Watch, StoreError>> + Send {
        let _ = key;
        async { Ok(Box::pin(tokio::time::sleep(Duration::from_millis(25))) as Watch) }
    }

    /// Checks that the store answers (readiness).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Counts the record of `key` against its tenant's `limits`, in one atomic step:
    /// it then holds an in-flight slot for `lease` and a record slot for `ttl` (each
    /// only where that cap is set). A record already counted is refreshed and never
    /// refused; a new one is refused, and nothing counted, when a cap is reached.
    /// Expired slots do not count. Called after a successful claim, and again at each
    /// lease renewal.
    fn admit(
        &self,
        key: &RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        let _ = (key, limits, lease, ttl);
        async { Err(tenant_limits_unsupported()) }
    }

    /// Ends the in-flight slot of `key`. `kept` is the record's retention when its
    /// outcome was stored (its record slot then expires `kept` from now), `None` when
    /// the key was released (the record slot goes too).
    fn settle(
        &self,
        key: &RecordKey,
        kept: Option<Duration>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (key, kept);
        async { Err(tenant_limits_unsupported()) }
    }

    /// Lists live (unexpired) records in flight, oldest claim first, at most `limit`,
    /// for operators: what is executing now, and what is stuck. Stores answer from an
    /// index of in-flight records, never from a scan of every record.
    fn list_in_flight(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<InFlightRecord>, StoreError>> + Send {
        let _ = limit;
        async { Err(in_flight_unsupported()) }
    }
}

/// The object-safe twin of [`Store`], for stores picked at run time (the proxy reads
/// a URL). Every `Store` is a `DynStore`, and `Arc<dyn DynStore>` is a `Store` again.
#[allow(missing_docs)]
pub trait DynStore: Send + Sync + 'static {
    fn claim<'a>(
        &'a self,
        key: &'a RecordKey,
        spec: ClaimSpec<'a>,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
    fn reclaim<'a>(
        &'a self,
        key: &'a RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'a>,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>>;
    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        token: FencingToken,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn release<'a>(
        &'a self,
        key: &'a RecordKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn get<'a>(&'a self, key: &'a RecordKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;
    fn delete<'a>(&'a self, key: &'a RecordKey) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
    fn watch<'a>(&'a self, key: &'a RecordKey) -> BoxFuture<'a, Result<Watch, StoreError>>;
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    fn admit<'a>(
        &'a self,
        key: &'a RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Admission, StoreError>>;
    fn settle<'a>(
        &'a self,
        key: &'a RecordKey,
        kept: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn list_in_flight(
        &self,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InFlightRecord>, StoreError>>;
}

impl<S: Store> DynStore for S {
    fn claim<'a>(
        &'a self,
        key: &'a RecordKey,
        spec: ClaimSpec<'a>,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(Store::claim(self, key, spec))
    }
    fn reclaim<'a>(
        &'a self,
        key: &'a RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'a>,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        Box::pin(Store::reclaim(self, key, stale, spec))
    }
    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        token: FencingToken,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::complete(self, key, token, response, ttl))
    }
    fn release<'a>(
        &'a self,
        key: &'a RecordKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::release(self, key, token))
    }
    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::renew(self, key, token, lease))
    }
    fn get<'a>(&'a self, key: &'a RecordKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(Store::get(self, key))
    }
    fn delete<'a>(&'a self, key: &'a RecordKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::delete(self, key))
    }
    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(Store::purge_expired(self))
    }
    fn watch<'a>(&'a self, key: &'a RecordKey) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(Store::watch(self, key))
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(Store::ping(self))
    }
    fn admit<'a>(
        &'a self,
        key: &'a RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Admission, StoreError>> {
        Box::pin(Store::admit(self, key, limits, lease, ttl))
    }
    fn settle<'a>(
        &'a self,
        key: &'a RecordKey,
        kept: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::settle(self, key, kept))
    }
    fn list_in_flight(
        &self,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InFlightRecord>, StoreError>> {
        Box::pin(Store::list_in_flight(self, limit))
    }
}

impl Store for Arc<dyn DynStore> {
    async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
        DynStore::claim(&**self, key, spec).await
    }
    async fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Option<Lease>, StoreError> {
        DynStore::reclaim(&**self, key, stale, spec).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        DynStore::complete(&**self, key, token, response, ttl).await
    }
    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<bool, StoreError> {
        DynStore::release(&**self, key, token).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        DynStore::renew(&**self, key, token, lease).await
    }
    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        DynStore::get(&**self, key).await
    }
    async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        DynStore::delete(&**self, key).await
    }
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        DynStore::purge_expired(&**self).await
    }
    async fn watch(&self, key: &RecordKey) -> Result<Watch, StoreError> {
        DynStore::watch(&**self, key).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        DynStore::ping(&**self).await
    }
    async fn admit(
        &self,
        key: &RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Admission, StoreError> {
        DynStore::admit(&**self, key, limits, lease, ttl).await
    }
    async fn settle(&self, key: &RecordKey, kept: Option<Duration>) -> Result<(), StoreError> {
        DynStore::settle(&**self, key, kept).await
    }
    async fn list_in_flight(&self, limit: usize) -> Result<Vec<InFlightRecord>, StoreError> {
        DynStore::list_in_flight(&**self, limit).await
    }
}

type WatchShard =
    std::sync::Mutex<std::collections::HashMap<RecordKey, tokio::sync::watch::Sender<()>>>;

/// In-process change notification for stores that live in this process (memory,
/// SQLite): waiters subscribe to a key and are woken by `notify`, without polling.
#[derive(Debug)]
pub struct Notifier {
    hasher: std::hash::RandomState,
    shards: Box<[WatchShard]>,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            hasher: std::hash::RandomState::new(),
            shards: (0..16).map(|_| Default::default()).collect(),
        }
    }
}

impl Notifier {
    fn shard(
        &self,
        key: &RecordKey,
    ) -> &std::sync::Mutex<std::collections::HashMap<RecordKey, tokio::sync::watch::Sender<()>>>
    {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(&key.key) as usize;
        &self.shards[h % self.shards.len()]
    }

    /// Subscribes to the next change of `key`.
    pub fn subscribe(&self, key: &RecordKey) -> Watch {
        let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let tx = map
            .entry(key.clone())
            .or_insert_with(|| tokio::sync::watch::channel(()).0);
        let mut rx = tx.subscribe();
        Box::pin(async move {
            let _ = rx.changed().await;
        })
    }

    /// Wakes every subscriber of `key`. Costs one map lookup when nobody waits.
    pub fn notify(&self, key: &RecordKey) {
        let tx = self
            .shard(key)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(tx) = tx {
            tx.send_replace(());
        }
    }
}

/// Wake-ups for stores that hear of changes from their server (Redis pub/sub,
/// PostgreSQL `LISTEN`): the store's listener task says when it is subscribed, when it
/// lost its connection, and which record (by storage id) changed. A watch resolves at
/// a change of its record, when the listener drops, or after `resync` at the latest;
/// while the listener is down, watches poll.
#[derive(Debug)]
pub struct RemoteWakeups {
    notifier: Notifier,
    /// True while the listener is subscribed.
    live: std::sync::atomic::AtomicBool,
    /// Bumped whenever the listener drops, so that watches re-read.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Default for RemoteWakeups {
    fn default() -> Self {
        RemoteWakeups {
            notifier: Notifier::default(),
            live: std::sync::atomic::AtomicBool::new(false),
            epoch: tokio::sync::watch::channel(0).0,
        }
    }
}

impl RemoteWakeups {
    /// The listener is subscribed: watches wait for notifications from now on.
    pub fn connected(&self) {
        self.live.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The listener lost its subscription: every pending watch resolves (its caller
    /// re-reads), and watches poll until [`RemoteWakeups::connected`].
    pub fn disconnected(&self) {
        if self.live.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.epoch.send_modify(|e| *e += 1);
        }
    }

    /// The record with this storage id changed.
    pub fn changed(&self, storage_id: &str) {
        self.notifier.notify(&Self::by_id(storage_id));
    }

    /// Watches `key`: see the type's docs.
    pub fn watch(&self, key: &RecordKey, poll: Duration, resync: Duration) -> Watch {
        // Subscribe to drops first, so a drop between the check and the subscription
        // still wakes this watch.
        let mut dropped = self.epoch.subscribe();
        if !self.live.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(tokio::time::sleep(poll));
        }
        let change = self.notifier.subscribe(&Self::by_id(&key.storage_id()));
        Box::pin(async move {
            tokio::select! {
                () = change => {}
                _ = dropped.changed() => {}
                () = tokio::time::sleep(resync) => {}
            }
        })
    }

    /// Notifications carry only the storage id: the notifier is keyed by it alone.
    fn by_id(storage_id: &str) -> RecordKey {
        RecordKey::new("", "", storage_id)
    }
}
