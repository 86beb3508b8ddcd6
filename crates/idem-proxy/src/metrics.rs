//! Prometheus metrics, and a store wrapper that measures every store call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::store::{DynStore, Watch};
use idem_core::{
    Admission, Claim, ClaimSpec, FencingToken, Lease, Record, RecordKey, Store, StoreError,
    StoredResponse, TenantLimits,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// The sidecar's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    store_latency: Family<OpLabel, Histogram>,
    in_flight: Gauge,
    stored_bytes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("idem");
        let requests = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "requests",
            "Requests by outcome: executed, replayed, in_use, reused, invalid, missing, too_large, store_error, passthrough, unknown, abandoned",
            requests.clone(),
        );
        let store_latency = Family::<OpLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ])
        });
        registry.register(
            "store_latency_seconds",
            "Latency of store operations",
            store_latency.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("in_flight", "Requests being served", in_flight.clone());
        let stored_bytes = Counter::default();
        registry.register(
            "stored_bytes",
            "Bytes of responses stored for replay",
            stored_bytes.clone(),
        );
        Metrics {
            registry,
            requests,
            store_latency,
            in_flight,
            stored_bytes,
        }
    }

    /// Counts one request with its outcome label.
    pub fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    fn store_op(&self, op: &'static str, elapsed: Duration) {
        self.store_latency
            .get_or_create(&OpLabel { op })
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The outcome label of a request, from what the layer reported.
pub fn outcome_label(outcome: Option<&idem_tower::Outcome>) -> &'static str {
    use idem_core::PassReason;
    use idem_tower::Outcome;
    match outcome {
        Some(Outcome::Executed) => "executed",
        Some(Outcome::Replayed) => "replayed",
        Some(Outcome::Unknown) => "unknown",
        Some(Outcome::Rejected(slug)) => match *slug {
            "idempotency-key-in-use" => "in_use",
            "idempotency-key-reused" => "reused",
            "idempotency-key-invalid" => "invalid",
            "idempotency-key-missing" => "missing",
            "idempotency-store-unavailable" | "idempotency-record-unreadable" => "store_error",
            "request-too-large" => "too_large",
            "idempotency-outcome-unknown" => "abandoned",
            _ => "rejected",
        },
        Some(Outcome::Passed(PassReason::StoreError)) => "passthrough",
        Some(Outcome::Passed(_)) | None => "unprotected",
        Some(_) => "other",
    }
}

/// A store that times every call into [`Metrics`] and counts stored bytes.
#[derive(Clone)]
pub struct MeteredStore {
    inner: Arc<dyn DynStore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for MeteredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredStore").finish_non_exhaustive()
    }
}

impl MeteredStore {
    /// Wraps a store.
    pub fn new(inner: Arc<dyn DynStore>, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    async fn timed<T>(&self, op: &'static str, fut: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let out = fut.await;
        self.metrics.store_op(op, start.elapsed());
        out
    }
}

impl Store for MeteredStore {
    async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
        self.timed("claim", Store::claim(&self.inner, key, spec))
            .await
    }
    async fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Option<Lease>, StoreError> {
        self.timed("reclaim", Store::reclaim(&self.inner, key, stale, spec))
            .await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let stored = self
            .timed(
                "complete",
                Store::complete(&self.inner, key, token, response, ttl),
            )
            .await?;
        if stored {
            self.metrics.stored_bytes.inc_by(response.size() as u64);
        }
        Ok(stored)
    }
    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<bool, StoreError> {
        self.timed("release", Store::release(&self.inner, key, token))
            .await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.timed("renew", Store::renew(&self.inner, key, token, lease))
            .await
    }
    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.timed("get", Store::get(&self.inner, key)).await
    }
    async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        self.timed("delete", Store::delete(&self.inner, key)).await
    }
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.timed("purge", Store::purge_expired(&self.inner)).await
    }
    async fn watch(&self, key: &RecordKey) -> Result<Watch, StoreError> {
        Store::watch(&self.inner, key).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", Store::ping(&self.inner)).await
    }
    async fn admit(
        &self,
        key: &RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Admission, StoreError> {
        self.timed("admit", Store::admit(&self.inner, key, limits, lease, ttl))
            .await
    }
    async fn settle(&self, key: &RecordKey, kept: Option<Duration>) -> Result<(), StoreError> {
        self.timed("settle", Store::settle(&self.inner, key, kept))
            .await
    }
}
