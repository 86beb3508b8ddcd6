//! Per-tenant caps: the [`TenantCounting`] capability, and how the engine holds it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{DynTenantCounting, Store, StoreError};
use crate::scope::RecordKey;

/// Per-tenant caps, checked when a request takes a new record (see [`TenantCounting::admit`]).
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

/// The answer to [`TenantCounting::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Counted (or already counted): the record may execute.
    Admitted,
    /// The tenant already has `max_in_flight` records in flight.
    InFlightFull,
    /// The tenant already holds `max_records` live records.
    RecordsFull,
}

/// The capability to count records per tenant, so that [`TenantLimits`] can be
/// enforced. [`Engine::with_tenant_limits`](crate::Engine::with_tenant_limits)
/// requires it: a store without it cannot be given caps.
pub trait TenantCounting: Store {
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
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send;

    /// Ends the in-flight slot of `key`. `kept` is the record's retention when its
    /// outcome was stored (its record slot then expires `kept` from now), `None` when
    /// the key was released (the record slot goes too).
    fn settle(
        &self,
        key: &RecordKey,
        kept: Option<Duration>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The engine's tenant caps, bound to the store that counts them. The engine is
/// generic over any [`Store`]; only
/// [`Engine::with_tenant_limits`](crate::Engine::with_tenant_limits), which requires
/// [`TenantCounting`], builds caps, keeping the store as an object-safe
/// [`DynTenantCounting`] handle beside them. So the engine counts only through a store
/// that can, and without caps it holds no handle and counts nothing.
#[derive(Clone, Default)]
pub(crate) struct TenantCaps(Option<(TenantLimits, Arc<dyn DynTenantCounting>)>);

impl TenantCaps {
    /// Caps counted by `store`; none when `limits` caps nothing.
    pub(crate) fn new<S: TenantCounting>(store: Arc<S>, limits: TenantLimits) -> Self {
        if limits.is_unlimited() {
            return TenantCaps(None);
        }
        TenantCaps(Some((limits, store)))
    }

    /// The caps (all `None` without caps).
    pub(crate) fn limits(&self) -> TenantLimits {
        self.0
            .as_ref()
            .map_or(TenantLimits::NONE, |(limits, _)| *limits)
    }

    /// Whether there is no cap: the engine then never counts.
    pub(crate) fn is_unlimited(&self) -> bool {
        self.0.is_none()
    }

    /// [`TenantCounting::admit`] under these caps; without caps every record is admitted.
    pub(crate) async fn admit(
        &self,
        key: &RecordKey,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Admission, StoreError> {
        match &self.0 {
            Some((limits, store)) => store.admit(key, *limits, lease, ttl).await,
            None => Ok(Admission::Admitted),
        }
    }

    /// [`TenantCounting::settle`]; without caps there is nothing to settle.
    pub(crate) async fn settle(
        &self,
        key: &RecordKey,
        kept: Option<Duration>,
    ) -> Result<(), StoreError> {
        match &self.0 {
            Some((_, store)) => store.settle(key, kept).await,
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for TenantCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.limits().fmt(f)
    }
}
