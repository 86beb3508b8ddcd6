//! Prometheus metrics, and a store wrapper that measures every store call.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use idem_core::store::DynStore;
use idem_core::{
    Claim, ClaimSpec, FencingToken, InFlightListing, Lease, RecordKey, Store, StoreError,
    StoredResponse, TenantCounting, Wakeups,
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
    store: &'static str,
}

/// `route` is a configured route pattern or `unmatched`: bounded by the configuration,
/// never by what clients send.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabel {
    outcome: &'static str,
    route: Arc<String>,
}

/// Buckets of request and upstream latency: 1 ms to 30 s.
const REQUEST_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The sidecar's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    request_duration: Family<RequestLabel, Histogram>,
    upstream_latency: Family<RouteLabel, Histogram>,
    store_latency: Family<OpLabel, Histogram>,
    store_errors: Family<OpLabel, Counter>,
    in_flight: Gauge,
    oldest_in_flight: Gauge<f64, std::sync::atomic::AtomicU64>,
    stored_bytes: Counter,
    /// The series of each outcome, looked up in the families once and then kept, so
    /// that counting a request takes no lock and hashes no label.
    outcome_series: [OnceLock<Counter>; OUTCOMES.len()],
    store_series: [OnceLock<(Histogram, Counter)>; STORE_OPS.len()],
}

/// Every outcome label [`outcome_label`] gives.
const OUTCOMES: [&str; 14] = [
    "executed",
    "replayed",
    "unknown",
    "in_use",
    "reused",
    "invalid",
    "missing",
    "store_error",
    "too_large",
    "abandoned",
    "rejected",
    "passthrough",
    "unprotected",
    "other",
];

/// Every store operation [`MeteredStore`] times.
const STORE_OPS: [&str; 12] = [
    "claim",
    "reclaim",
    "complete",
    "release",
    "renew",
    "get",
    "delete",
    "purge",
    "ping",
    "admit",
    "settle",
    "list_in_flight",
];

fn slot(labels: &[&str], label: &str) -> usize {
    labels
        .iter()
        .position(|l| *l == label)
        .expect("a label of the fixed list")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("idem");
        let store_buckets = || {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ])
        };
        Metrics {
            requests: registered(
                &mut r,
                "requests",
                "Requests by outcome: executed, replayed, in_use, reused, invalid, missing, too_large, store_error, passthrough, unknown, abandoned",
                Family::default(),
            ),
            store_latency: registered(
                &mut r,
                "store_latency_seconds",
                "Latency of store operations, by operation and store",
                Family::new_with_constructor(store_buckets),
            ),
            store_errors: registered(
                &mut r,
                "store_errors",
                "Store operations that failed, by operation and store",
                Family::default(),
            ),
            request_duration: registered(
                &mut r,
                "request_duration_seconds",
                "Time to answer a request, by outcome and configured route",
                Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS)),
            ),
            upstream_latency: registered(
                &mut r,
                "upstream_latency_seconds",
                "Time from sending a request upstream to its response headers, by configured route",
                Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS)),
            ),
            oldest_in_flight: registered(
                &mut r,
                "in_flight_oldest_age_seconds",
                "Age of the oldest record in flight in the store (0 when none), read at each scrape",
                Gauge::default(),
            ),
            in_flight: registered(
                &mut r,
                "in_flight",
                "Requests being served",
                Gauge::default(),
            ),
            stored_bytes: registered(
                &mut r,
                "stored_bytes",
                "Bytes of responses stored for replay",
                Counter::default(),
            ),
            registry: r,
            outcome_series: Default::default(),
            store_series: Default::default(),
        }
    }

    /// Counts one request and records how long it took, by outcome and route.
    pub fn request(&self, outcome: &'static str, route: &Route, elapsed: Duration) {
        let i = slot(&OUTCOMES, outcome);
        self.outcome_series[i]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&OutcomeLabel { outcome })
                    .clone()
            })
            .inc();
        route.durations[i]
            .get_or_init(|| {
                self.request_duration
                    .get_or_create(&RequestLabel {
                        outcome,
                        route: route.name.clone(),
                    })
                    .clone()
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one upstream round trip (to the response headers).
    pub fn upstream(&self, route: &Route, elapsed: Duration) {
        route
            .upstream
            .get_or_init(|| {
                self.upstream_latency
                    .get_or_create(&RouteLabel {
                        route: route.name.clone(),
                    })
                    .clone()
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Sets the age of the oldest record in flight.
    pub fn set_oldest_in_flight(&self, age: Duration) {
        self.oldest_in_flight.set(age.as_secs_f64());
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    fn store_op(&self, label: &OpLabel, elapsed: Duration, failed: bool) {
        let series = || {
            (
                self.store_latency.get_or_create(label).clone(),
                self.store_errors.get_or_create(label).clone(),
            )
        };
        let uncached;
        let (latency, errors) = match STORE_OPS.iter().position(|o| *o == label.op) {
            Some(i) => self.store_series[i].get_or_init(series),
            None => {
                uncached = series();
                &uncached
            }
        };
        latency.observe(elapsed.as_secs_f64());
        if failed {
            errors.inc();
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Registers `metric` under `name` and returns it (a handle sharing its values).
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// The outcome label of a request, from what the layer reported.
pub fn outcome_label(outcome: Option<&idem_tower::Outcome>) -> &'static str {
    use idem_core::PassReason;
    use idem_tower::Outcome;
    match outcome {
        Some(Outcome::Executed) => "executed",
        Some(Outcome::Replayed) => "replayed",
        Some(Outcome::Unknown) => "unknown",
        Some(Outcome::Rejected(kind)) => kind.metric_label(),
        Some(Outcome::Passed(PassReason::StoreError)) => "passthrough",
        Some(Outcome::Passed(_)) | None => "unprotected",
        Some(_) => "other",
    }
}

/// The `route` labels: one per configured route (its method, or `*` for any, and its
/// pattern), and `unmatched`; computed once, with their series, so that labelling a
/// request allocates nothing and takes no lock.
#[derive(Debug, Clone)]
pub struct RouteLabels(Arc<LabelTable>);

#[derive(Debug)]
struct LabelTable {
    routes: Arc<idem_core::Routes>,
    /// One per configured route, then `unmatched`.
    labels: Vec<Route>,
}

/// One `route` label and its series.
#[derive(Debug)]
pub struct Route {
    name: Arc<String>,
    upstream: OnceLock<Histogram>,
    durations: [OnceLock<Histogram>; OUTCOMES.len()],
}

impl Route {
    fn new(name: String) -> Self {
        Route {
            name: Arc::new(name),
            upstream: OnceLock::new(),
            durations: Default::default(),
        }
    }

    /// The route's label value, as it appears on the metrics page.
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl RouteLabels {
    /// The labels of a route table.
    pub fn new(routes: Arc<idem_core::Routes>) -> Self {
        let labels = routes
            .routes()
            .iter()
            .map(|r| {
                let m = r.method.as_ref().map_or("*", http::Method::as_str);
                Route::new(format!("{m} {}", r.pattern.as_str()))
            })
            .chain([Route::new("unmatched".to_owned())])
            .collect();
        RouteLabels(Arc::new(LabelTable { routes, labels }))
    }

    /// The index of a request's label: the first configured route it matches, as
    /// routing does.
    pub fn index(&self, method: &http::Method, path: &str) -> usize {
        self.0
            .routes
            .routes()
            .iter()
            .position(|r| r.method.as_ref().is_none_or(|m| m == method) && r.pattern.matches(path))
            .unwrap_or(self.0.labels.len() - 1)
    }

    /// The label at an [`index`](Self::index).
    pub fn get(&self, index: usize) -> &Route {
        &self.0.labels[index]
    }
}

/// A store that times every call into [`Metrics`], counts its failures and stored
/// bytes, and traces it (a span per call, named after the operation).
#[derive(Clone)]
pub struct MeteredStore {
    inner: Arc<dyn DynStore>,
    metrics: Arc<Metrics>,
    store: &'static str,
    /// With traces on: the request span of each claim this process holds, so that
    /// storing its outcome (which runs as the response body ends, outside the
    /// request's task) is traced as part of the request.
    claims: Option<Arc<std::sync::Mutex<HashMap<RecordKey, tracing::Span>>>>,
}

/// Claims whose execution vanished without complete or release (a panic) leave their
/// span behind; past this many the map is cleared rather than grown.
const MAX_TRACED_CLAIMS: usize = 65_536;

impl std::fmt::Debug for MeteredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredStore").finish_non_exhaustive()
    }
}

impl MeteredStore {
    /// Wraps a store; `store` is its label (see [`StoreUrl::label`](crate::store::StoreUrl::label)).
    pub fn new(inner: Arc<dyn DynStore>, metrics: Arc<Metrics>, store: &'static str) -> Self {
        MeteredStore {
            inner,
            metrics,
            store,
            claims: None,
        }
    }

    /// Traces store calls as children of the request that holds the key.
    #[must_use]
    pub fn with_traces(mut self, on: bool) -> Self {
        self.claims = on.then(Default::default);
        self
    }

    /// The span of one store call, with traces on: a child of the current span, else
    /// of the request that claimed `key` (forgotten when `ends` the claim), else none
    /// at all (the lease renewals of a background task are not worth a trace of their
    /// own). With traces off, none: they cost nothing then.
    fn span(&self, op: &'static str, key: Option<&RecordKey>, ends: bool) -> tracing::Span {
        let Some(claims) = &self.claims else {
            return tracing::Span::none();
        };
        let current = tracing::Span::current();
        let claimed = key.and_then(|key| {
            let mut map = claims.lock().unwrap_or_else(|e| e.into_inner());
            if ends {
                map.remove(key)
            } else {
                map.get(key).cloned()
            }
        });
        let parent = match claimed {
            _ if !current.is_none() => current,
            Some(span) => span,
            None => return tracing::Span::none(),
        };
        tracing::info_span!(parent: &parent, "store", otel.name = op, store = self.store)
    }

    /// Remembers the request span of a claim just taken.
    fn claimed(&self, key: &RecordKey) {
        if let Some(claims) = &self.claims {
            let mut map = claims.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= MAX_TRACED_CLAIMS {
                map.clear();
            }
            map.insert(key.clone(), tracing::Span::current());
        }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        key: Option<&RecordKey>,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        use tracing::Instrument;
        let span = self.span(op, key, matches!(op, "complete" | "release"));
        let start = Instant::now();
        let out = fut.instrument(span).await;
        let label = OpLabel {
            op,
            store: self.store,
        };
        self.metrics.store_op(&label, start.elapsed(), out.is_err());
        out
    }
}

impl Store for MeteredStore {
    async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
        let claim = self
            .timed("claim", Some(key), Store::claim(&self.inner, key, spec))
            .await?;
        if matches!(claim, Claim::Acquired(_)) {
            self.claimed(key);
        }
        Ok(claim)
    }
    async fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Option<Lease>, StoreError> {
        let lease = self
            .timed(
                "reclaim",
                Some(key),
                Store::reclaim(&self.inner, key, stale, spec),
            )
            .await?;
        if lease.is_some() {
            self.claimed(key);
        }
        Ok(lease)
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
                Some(key),
                Store::complete(&self.inner, key, token, response, ttl),
            )
            .await?;
        if stored {
            self.metrics.stored_bytes.inc_by(response.size() as u64);
        }
        Ok(stored)
    }
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.timed("purge", None, Store::purge_expired(&self.inner))
            .await
    }
    idem_core::forward_store!(inner, around timed => release, renew, get, delete, ping);
}

impl TenantCounting for MeteredStore {
    idem_core::forward_store!(inner, around timed => admit, settle);
}

// A watch is a wait, not a store call: not timed.
impl Wakeups for MeteredStore {
    idem_core::forward_store!(inner => watch);
}

impl InFlightListing for MeteredStore {
    idem_core::forward_store!(inner, around timed => list_in_flight);
}
