//! The `Store` trait: small, atomic operations. Stores store; the engine decides.
//!
//! [`Store`] holds what every store does (claim, complete, release, renew, read,
//! delete, purge, ping). What only some stores can do is a capability trait on top,
//! which the compiler checks where it is needed:
//!
//! - [`TenantCounting`] (per-tenant caps), required by
//!   [`Engine::with_tenant_limits`](crate::Engine::with_tenant_limits);
//! - [`Wakeups`] (say when a record changes), required by the
//!   [`Engine`](crate::Engine), whose wait mode sleeps on it; a store that cannot
//!   notify says so by polling ([`wakeups::poll`]);
//! - [`InFlightListing`] (what is executing now), for operators' pages.
//!
//! [`DynStore`] is the object-safe twin of all four, for a store picked at run time.
//! Wrappers forward what they do not change with [`forward_store!`](crate::forward_store),
//! so that no method is forwarded by hand, or forgotten.

use std::future::Future;
use std::time::Duration;

use crate::fingerprint::Fingerprint;
use crate::record::{FencingToken, Lease, Record, StoredResponse, UnixMillis};
use crate::scope::RecordKey;

mod dynamic;
mod forward;
mod tenant;
pub mod wakeups;

pub use dynamic::{BoxFuture, DynStore, DynTenantCounting};
pub(crate) use tenant::TenantCaps;
pub use tenant::{Admission, TenantCounting, TenantLimits};
pub use wakeups::{Notifier, RemoteWakeups, Wakeups, Watch};

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

/// A record in flight, as [`InFlightListing::list_in_flight`] lists it: which key, since when,
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

    /// Checks that the store answers (readiness).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The capability to list the records in flight, for operators (the proxy's admin
/// page and its oldest-in-flight gauge).
pub trait InFlightListing: Store {
    /// Lists live (unexpired) records in flight, oldest claim first, at most `limit`,
    /// for operators: what is executing now, and what is stuck. Stores answer from an
    /// index of in-flight records, never from a scan of every record.
    fn list_in_flight(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<InFlightRecord>, StoreError>> + Send;
}
