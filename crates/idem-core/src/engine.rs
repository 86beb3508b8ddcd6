//! The engine: turns a request into execute, replay or reject (SPEC §4), and an
//! execution's outcome into a stored record or a released key (SPEC §6).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use tracing::Instrument;

use crate::detach::{Detached, panic_message};
use crate::fingerprint::{Fingerprint, fingerprint};
use crate::key::{IdempotencyKey, KeyError};
use crate::policy::{ErrorFormat, KeyRequirement, OnAbandoned, OnConcurrent, OnStoreError, Policy};
use crate::problem::{Problem, ProblemKind, Rejection, TenantCap};
use crate::record::{
    BodyKept, FencingToken, Record, RecordState, Recorded, StoredResponse, now_millis,
};
use crate::scope::{RecordKey, TenantHasher};
use crate::store::{
    Admission, Claim, ClaimSpec, Store, StoreError, StoreErrorKind, TenantCaps, TenantCounting,
    TenantLimits, Wakeups,
};

/// `Idempotent-Replayed`, set to `true` on every replay.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The request id header kept from the original request.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// The key header echoed on replays when a route names no other.
pub const KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// Why a request passed through without protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PassReason {
    /// The method is not protected on this route, or idempotency is off.
    NotProtected,
    /// No key, and the key is optional.
    NoKey,
    /// The store failed and the route says `on_store_error = "passthrough"`.
    StoreError,
}

/// What to do with a request.
#[must_use]
pub enum Decision<S: Store> {
    /// Serve it without idempotency.
    Pass(PassReason),
    /// Execute it; report the outcome through the execution.
    Execute(Execution<S>),
    /// Answer with the stored outcome.
    Replay(Replay),
    /// Refuse it; nothing was stored.
    Reject(Rejection, ErrorFormat),
}

impl<S: Store> std::fmt::Debug for Decision<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Pass(r) => f.debug_tuple("Pass").field(r).finish(),
            Decision::Execute(e) => f.debug_tuple("Execute").field(e).finish(),
            Decision::Replay(r) => f.debug_tuple("Replay").field(&r.response.status).finish(),
            Decision::Reject(r, _) => f.debug_tuple("Reject").field(r).finish(),
        }
    }
}

/// A stored outcome to send back.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The stored response.
    pub response: StoredResponse,
    /// The key, echoed.
    pub key: IdempotencyKey,
    /// The route's error format (for a non-replayable body).
    pub error_format: ErrorFormat,
    /// The header the key is echoed in: the route's first accepted key header.
    pub key_header: HeaderName,
}

impl Replay {
    /// The replay of `response`, stored under `key`, on a route with `policy`.
    fn of(policy: &Policy, response: StoredResponse, key: IdempotencyKey) -> Self {
        Replay {
            response,
            key,
            error_format: policy.error_format,
            key_header: policy.header_names.first().cloned().unwrap_or(KEY_HEADER),
        }
    }

    /// The replayed response: original status, headers and body, plus
    /// `Idempotent-Replayed: true`, the key and the original `X-Request-Id`.
    pub fn into_response(self) -> Response<Bytes> {
        let stored = self.response;
        let status =
            StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let replayable = stored.is_replayable();
        let mut res = match unkept_body(stored.body_kept) {
            Some((kind, detail)) => Problem::of(kind, detail)
                .with_status(status)
                .with_extension("original_status", stored.status)
                .to_response(self.error_format),
            None => {
                let mut res = Response::new(stored.body);
                *res.status_mut() = status;
                res
            }
        };
        let h = res.headers_mut();
        // Room for the stored headers and the four added here and by the sidecar, so
        // that the map is not grown (and rehashed) header by header.
        h.reserve(stored.headers.len() + 4);
        append_stored_headers(h, stored.headers, replayable);
        h.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        if let Ok(v) = HeaderValue::from_str(self.key.as_str()) {
            h.insert(self.key_header, v);
        }
        // The id the first caller saw: the upstream's own `X-Request-Id` when it sent one
        // (it is among the stored headers), else the id of the request that executed.
        if !h.contains_key(REQUEST_ID_HEADER)
            && let Some(id) = stored
                .request_id
                .and_then(|id| HeaderValue::from_str(&id).ok())
        {
            h.insert(REQUEST_ID_HEADER, id);
        }
        res
    }
}

/// The problem a replay answers instead of a body that was not kept, and why.
fn unkept_body(kept: BodyKept) -> Option<(ProblemKind, &'static str)> {
    match kept {
        BodyKept::TooLarge => Some((
            ProblemKind::ResponseNotReplayable,
            "the request with this key was executed, but its response was too large to be stored; \
             the original status is given, the body is not",
        )),
        BodyKept::BrokenOff => Some((
            ProblemKind::ResponseIncomplete,
            "the request with this key was executed, but its response broke off before its end \
             (the upstream or the handler failed while sending it); the original status is given, \
             the body is not",
        )),
        _ => None,
    }
}

/// Appends the stored response headers; for a body that was not kept, not those
/// describing it.
fn append_stored_headers(
    h: &mut HeaderMap,
    stored: Vec<(HeaderName, HeaderValue)>,
    replayable: bool,
) {
    let describes_body = |n: &HeaderName| {
        [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
        ]
        .contains(n)
    };
    for (name, value) in stored {
        if replayable || !describes_body(&name) {
            h.append(name, value);
        }
    }
}

/// The engine: one per service, cheap to clone.
pub struct Engine<S> {
    store: Arc<S>,
    tenants: Arc<TenantHasher>,
    limits: TenantCaps,
    executions: Arc<Executions>,
}

impl<S> std::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("tenants", &self.tenants)
            .finish_non_exhaustive()
    }
}

impl<S> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Engine {
            store: self.store.clone(),
            tenants: self.tenants.clone(),
            limits: self.limits.clone(),
            executions: self.executions.clone(),
        }
    }
}

/// The executions of an engine (and its clones) that hold a claim, or may be about to
/// take one: each ends with its outcome stored, its key released, or (a crash, an
/// unknown outcome) its lease running out. A graceful shutdown waits for
/// [`Executions::idle`] before the process exits, so that no claim is dropped with the
/// runtime while the work it guards is done or under way.
#[derive(Debug, Default)]
pub struct Executions {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Executions {
    /// How many are running.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Resolves when none is running.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so an end between the two still wakes it.
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn track(self: &Arc<Self>) -> Tracked {
        self.running.fetch_add(1, Ordering::SeqCst);
        Tracked(self.clone())
    }
}

/// One running execution of [`Executions`], counted until dropped.
#[derive(Debug)]
struct Tracked(Arc<Executions>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A store failure while deciding, by what the store had said before it.
enum Failure {
    /// The store could not be asked: nothing is known of the key.
    Unasked(StoreError),
    /// The store had answered for this key (it is in flight or done), or holds a record
    /// it cannot read: the request must not run unprotected.
    Known(StoreError),
}

impl Failure {
    /// A failed claim: `answered` is whether the store had answered for this key
    /// before. A record that cannot be read is known to exist.
    fn of_claim(e: StoreError, answered: bool) -> Self {
        if answered || e.kind() == StoreErrorKind::Corrupt {
            Failure::Known(e)
        } else {
            Failure::Unasked(e)
        }
    }
}

/// The answer to a store failure while deciding, as the route says.
fn failed<S: Store>(policy: &Policy, route: &str, failure: Failure) -> Decision<S> {
    let reject = |r: Rejection| Decision::Reject(r, policy.error_format);
    let unavailable = Rejection::StoreUnavailable {
        retry_after: policy.retry_after_secs,
    };
    match failure {
        Failure::Unasked(e) => {
            tracing::warn!(error = %e, route, "idempotency store error");
            match policy.on_store_error {
                OnStoreError::Reject => reject(unavailable),
                OnStoreError::Passthrough => Decision::Pass(PassReason::StoreError),
            }
        }
        Failure::Known(e) if e.kind() == StoreErrorKind::Corrupt => {
            tracing::error!(error = %e, route, "an idempotency record cannot be read");
            reject(Rejection::RecordUnreadable)
        }
        Failure::Known(e) => {
            tracing::warn!(error = %e, route, "idempotency store error after it answered");
            reject(unavailable)
        }
    }
}

/// What a claim that found a record leads to.
enum Step {
    /// The key is ours (an abandoned record taken over).
    Acquired(FencingToken),
    /// The outcome is stored: replay it.
    Replay(StoredResponse),
    /// Refuse the request.
    Reject(Rejection),
    /// The record changed under the claim: claim again, within [`CLAIM_ATTEMPTS`].
    ClaimAgain,
    /// A wait ended: claim again, with the attempts counted anew.
    ClaimAfresh,
}

/// The refusal of a concurrent duplicate.
fn in_use(policy: &Policy) -> Rejection {
    Rejection::InUse {
        status: policy.in_use_status,
        retry_after: policy.retry_after_secs,
    }
}

/// How many times a claim is retried when the record changes under it (taken over,
/// released) before the request is answered `in use`.
const CLAIM_ATTEMPTS: usize = 4;

impl<S: Wakeups> Engine<S> {
    /// An engine over a store. The store must say when a record changes
    /// ([`Wakeups`]): requests waiting for a concurrent duplicate sleep on it.
    pub fn new(store: Arc<S>, tenants: TenantHasher) -> Self {
        Engine {
            store,
            tenants: Arc::new(tenants),
            limits: TenantCaps::default(),
            executions: Arc::default(),
        }
    }

    /// Replaces the tenant hasher, keeping the store, the caps and the executions.
    #[must_use]
    pub fn with_tenants(mut self, tenants: TenantHasher) -> Self {
        self.tenants = Arc::new(tenants);
        self
    }

    /// The executions under way, for a graceful shutdown.
    pub fn executions(&self) -> &Arc<Executions> {
        &self.executions
    }

    /// The per-tenant caps.
    pub fn tenant_limits(&self) -> TenantLimits {
        self.limits.limits()
    }

    /// The store the engine claims and completes keys in (shared with the admin API
    /// and the clones of this engine).
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The tenant hasher.
    pub fn tenants(&self) -> &TenantHasher {
        &self.tenants
    }

    /// Decides what to do with a request. `route` is the matched route pattern (or
    /// method + path); `body` the whole request body (callers enforce
    /// `max_request_bytes` while buffering; it is checked again here).
    pub async fn begin(
        &self,
        policy: &Arc<Policy>,
        route: &str,
        parts: &http::request::Parts,
        body: &[u8],
    ) -> Decision<S> {
        if !policy.protects(&parts.method) {
            return Decision::Pass(PassReason::NotProtected);
        }
        let reject = |r: Rejection| Decision::Reject(r, policy.error_format);
        let key = match extract_key(policy, &parts.headers) {
            Ok(Some(key)) => key,
            Ok(None) if policy.key == KeyRequirement::Required => {
                return reject(Rejection::KeyMissing);
            }
            Ok(None) => return Decision::Pass(PassReason::NoKey),
            Err(e) => return reject(Rejection::KeyInvalid(e)),
        };
        if body.len() > policy.max_request_bytes {
            return reject(Rejection::RequestTooLarge {
                limit: policy.max_request_bytes,
            });
        }
        let record_key =
            RecordKey::new(self.tenants.tenant_of(&parts.headers), route, key.as_str());
        let fp = fingerprint(
            policy.fingerprint,
            &parts.method,
            &parts.uri,
            &parts.headers,
            &policy.fingerprint_headers,
            body,
        );
        let request_id = parts
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // The decision runs to its end even if the caller goes away (then in a task of
        // its own): a caller that leaves mid-claim must not leave a claim applied in the
        // store with nobody to execute or release it. An execution nobody takes
        // releases its key when dropped.
        let tracked = self.executions.track();
        let (engine, owned_policy) = (self.clone(), policy.clone());
        let decided = Detached::new(async move {
            engine
                .decide(&owned_policy, record_key, key, fp, request_id, tracked)
                .await
        })
        .await
        .unwrap_or_else(|panic| {
            let failed = StoreError::msg(
                StoreErrorKind::Backend,
                format!("the decision failed: {}", panic_message(&panic)),
            );
            Err(Failure::Known(failed))
        });
        decided.unwrap_or_else(|failure| failed(policy, route, failure))
    }

    async fn decide(
        &self,
        policy: &Arc<Policy>,
        record_key: RecordKey,
        key: IdempotencyKey,
        fp: Fingerprint,
        request_id: Option<String>,
        tracked: Tracked,
    ) -> Result<Decision<S>, Failure> {
        let spec = ClaimSpec {
            fingerprint: &fp,
            lease: policy.lease,
            ttl: policy.ttl,
        };
        let deadline = tokio::time::Instant::now() + policy.wait_timeout;
        let mut attempts = 0;
        // Whether the store has answered for this key yet.
        let mut answered = false;
        let token = loop {
            attempts += 1;
            let claimed = (self.store.claim(&record_key, spec).await)
                .map_err(|e| Failure::of_claim(e, answered))?;
            answered = true;
            let record = match claimed {
                Claim::Acquired(lease) => break lease.token,
                Claim::Existing(record) => record,
            };
            let step = self
                .on_existing(policy, &record_key, &key, spec, record, deadline)
                .await?;
            match step {
                Step::Acquired(token) => break token,
                Step::Replay(response) => {
                    return Ok(Decision::Replay(Replay::of(policy, response, key)));
                }
                Step::Reject(rejection) => {
                    return Ok(Decision::Reject(rejection, policy.error_format));
                }
                Step::ClaimAgain if attempts >= CLAIM_ATTEMPTS => {
                    return Ok(Decision::Reject(in_use(policy), policy.error_format));
                }
                Step::ClaimAgain => {}
                Step::ClaimAfresh => attempts = 0,
            }
        };
        let held = Held {
            record_key,
            key,
            token,
            request_id,
            tracked,
        };
        self.execute(policy, held).await.map_err(Failure::Known)
    }

    /// A claim found a record for the key: replay it, refuse, take it over (its
    /// executor died) or, in wait mode, wait for it to change.
    async fn on_existing(
        &self,
        policy: &Policy,
        record_key: &RecordKey,
        key: &IdempotencyKey,
        spec: ClaimSpec<'_>,
        record: Record,
        deadline: tokio::time::Instant,
    ) -> Result<Step, Failure> {
        if !spec.fingerprint.matches(&record.fingerprint) {
            return Ok(Step::Reject(Rejection::KeyReused {
                status: policy.mismatch_status,
            }));
        }
        match record.state {
            RecordState::Completed(response) => Ok(Step::Replay(response)),
            RecordState::InFlight {
                token,
                lease_expires_at,
            } if lease_expires_at <= now_millis() => {
                self.take_over(policy, record_key, key, token, spec).await
            }
            RecordState::InFlight { .. } if policy.on_concurrent == OnConcurrent::Reject => {
                Ok(Step::Reject(in_use(policy)))
            }
            RecordState::InFlight { token, .. } => {
                self.wait_for(policy, record_key, token, deadline).await
            }
        }
    }

    /// The record's executor died (its lease ended): execute again under a new token,
    /// unless the route refuses to.
    async fn take_over(
        &self,
        policy: &Policy,
        record_key: &RecordKey,
        key: &IdempotencyKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Step, Failure> {
        if policy.on_abandoned == OnAbandoned::Reject {
            return Ok(Step::Reject(Rejection::Abandoned));
        }
        let reclaimed = self.store.reclaim(record_key, stale, spec).await;
        if let Some(lease) = reclaimed.map_err(Failure::Known)? {
            tracing::info!(key = %key, route = %record_key.route, "re-executing an abandoned request");
            return Ok(Step::Acquired(lease.token));
        }
        // Someone else took it over or it completed meanwhile: look again.
        Ok(Step::ClaimAgain)
    }

    /// Wait mode: waits until the record held by `token` changes, its lease ends or
    /// the route's `wait_timeout` is up.
    async fn wait_for(
        &self,
        policy: &Policy,
        record_key: &RecordKey,
        token: FencingToken,
        deadline: tokio::time::Instant,
    ) -> Result<Step, Failure> {
        // Subscribe first, then re-read, so no change is missed.
        let watch = self.store.watch(record_key).await.map_err(Failure::Known)?;
        let lease_expires_at = match self.store.get(record_key).await.map_err(Failure::Known)? {
            Some(Record {
                state:
                    RecordState::InFlight {
                        token: t,
                        lease_expires_at,
                    },
                ..
            }) if t == token => lease_expires_at,
            // Changed already: completed, released or taken over. Claim again.
            _ => return Ok(Step::ClaimAfresh),
        };
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Ok(Step::Reject(in_use(policy)));
        }
        // Wake at the lease end too, in case the holder dies while we wait.
        let lease_left = Duration::from_millis(lease_expires_at.saturating_sub(now_millis()) + 1);
        let _ = tokio::time::timeout(remaining.min(lease_left), watch).await;
        Ok(Step::ClaimAfresh)
    }

    /// The claim is held: count it against the tenant's caps, then execute. Refused
    /// (or not countable), the claim is released, so nothing stays held for a request
    /// that was not run.
    async fn execute(&self, policy: &Arc<Policy>, held: Held) -> Result<Decision<S>, StoreError> {
        let (record_key, token) = (&held.record_key, held.token);
        if !self.limits.is_unlimited() {
            let admitted = self
                .limits
                .admit(record_key, policy.lease, policy.ttl)
                .await;
            let refused = match admitted {
                Ok(Admission::Admitted) => None,
                Ok(Admission::InFlightFull) => Some(TenantCap::InFlight),
                Ok(Admission::RecordsFull) => Some(TenantCap::Records),
                Err(e) => {
                    // The admission may have applied with its answer lost: give the
                    // tenant's slot back with the key, or it stays taken until its
                    // window ends.
                    if let Ok(true) = self.store.release(record_key, token).await
                        && let Err(e) = self.limits.settle(record_key, None).await
                    {
                        tracing::warn!(error = %e, route = %record_key.route, "could not settle the tenant's count");
                    }
                    return Err(e);
                }
            };
            if let Some(cap) = refused {
                if let Err(e) = self.store.release(record_key, token).await {
                    tracing::warn!(error = %e, route = %record_key.route, "could not release a refused claim");
                }
                return Ok(Decision::Reject(
                    Rejection::TenantLimitReached {
                        cap,
                        retry_after: policy.retry_after_secs,
                    },
                    policy.error_format,
                ));
            }
        }
        Ok(Decision::Execute(Execution::start(
            self.store.clone(),
            policy.clone(),
            self.limits.clone(),
            held,
        )))
    }
}

impl<S: TenantCounting> Engine<S> {
    /// Caps what one tenant may hold: records in flight and live records. A request
    /// that would take a new record past a cap is refused with
    /// [`Rejection::TenantLimitReached`] (429) and nothing is executed; replays and
    /// duplicates of records already held are never refused.
    ///
    /// Only a store that counts records per tenant ([`TenantCounting`]) can be given
    /// caps, which the compiler checks here; every store in this project does. The
    /// engine keeps the caps with a handle on that capability of its store (an
    /// `Arc<dyn DynTenantCounting>`), so the rest of it needs only a [`Store`], and
    /// without caps nothing is counted.
    #[must_use]
    pub fn with_tenant_limits(mut self, limits: TenantLimits) -> Self {
        self.limits = TenantCaps::new(self.store.clone(), limits);
        self
    }
}

/// A claim just acquired, not yet an [`Execution`].
struct Held {
    record_key: RecordKey,
    key: IdempotencyKey,
    token: FencingToken,
    request_id: Option<String>,
    tracked: Tracked,
}

/// Finds the key among the accepted header names.
fn extract_key(policy: &Policy, headers: &HeaderMap) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut found: Option<(&HeaderName, IdempotencyKey)> = None;
    for name in &policy.header_names {
        let mut values = headers.get_all(name).iter();
        let Some(raw) = values.next() else { continue };
        if values.next().is_some() {
            return Err(KeyError::Repeated(name.to_string()));
        }
        let key = IdempotencyKey::parse(raw.as_bytes(), &policy.key_rules)?;
        match &found {
            Some((first, k)) if *k != key => {
                return Err(KeyError::Conflicting {
                    first: first.to_string(),
                    second: name.to_string(),
                });
            }
            Some(_) => {}
            None => found = Some((name, key)),
        }
    }
    Ok(found.map(|(_, k)| k))
}

/// What became of an execution's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finished {
    /// Stored; later requests replay it.
    Stored,
    /// The key was released; a retry executes again.
    Released,
    /// The lease was lost (taken over after it expired): the outcome was refused.
    Fenced,
}

/// What the handler says of its outcome, before the policy has its say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Keep {
    /// Store it if the route's policy stores its status (the usual case).
    AsPolicy,
    /// The handler asked not to store it (`NoStore`: nothing changed): the key is
    /// released and a retry executes again.
    Nothing,
}

/// The permit to execute one request. Renews its lease in the background while it
/// lives. Dropped before [`Execution::mark_started`], it releases the key in the
/// background (nothing ran). Dropped after, without [`Execution::finish`] or
/// [`Execution::release`], it stops the renewal: the outcome is unknown, the lease
/// then expires and the key follows `on_abandoned`.
pub struct Execution<S: Store> {
    store: Arc<S>,
    policy: Arc<Policy>,
    limits: TenantCaps,
    record_key: RecordKey,
    key: IdempotencyKey,
    token: FencingToken,
    request_id: Option<String>,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
    /// Whether the request was handed to its handler.
    started: bool,
    tracked: Option<Tracked>,
}

impl<S: Store> std::fmt::Debug for Execution<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution")
            .field("record_key", &self.record_key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl<S: Store> Drop for Execution<S> {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.started {
            return;
        }
        // Nothing ran: free the key now rather than at the end of its lease. Without a
        // runtime the lease expires instead.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, key, token) = (self.store.clone(), self.record_key.clone(), self.token);
        let (limits, tracked) = (self.limits.clone(), self.tracked.take());
        let release = async move {
            let _tracked = tracked;
            match store.release(&key, token).await {
                Ok(true) if !limits.is_unlimited() => {
                    if let Err(e) = limits.settle(&key, None).await {
                        tracing::warn!(error = %e, route = %key.route, "could not settle the tenant's count");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, route = %key.route, "could not release a claim whose request went away; it ends with its lease");
                }
            }
        };
        handle.spawn(release.in_current_span());
    }
}

impl<S: Store> Execution<S> {
    fn start(store: Arc<S>, policy: Arc<Policy>, limits: TenantCaps, held: Held) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = spawn_in_span(renew_loop(
            store.clone(),
            held.record_key.clone(),
            held.token,
            Renewal {
                lease: policy.lease,
                ttl: policy.ttl,
                limits: limits.clone(),
            },
            lost.clone(),
        ));
        Execution {
            store,
            policy,
            limits,
            record_key: held.record_key,
            key: held.key,
            token: held.token,
            request_id: held.request_id,
            lost,
            renewer,
            started: false,
            tracked: Some(held.tracked),
        }
    }

    /// The request is handed to its handler: from now on its outcome matters, and
    /// dropping the execution leaves the key in flight until the lease ends instead of
    /// releasing it.
    pub fn mark_started(&mut self) {
        self.started = true;
    }

    /// The record's identity.
    pub fn record_key(&self) -> &RecordKey {
        &self.record_key
    }

    /// The idempotency key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// This execution's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The route's policy.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Whether the lease was seen lost (another executor took the key over).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Reports the outcome: stored or released as the policy says. A body that was
    /// not recorded whole (too large, broken off) stores status and headers, and its
    /// replay is a problem; [`Keep::Nothing`] is the handler's "do not store".
    pub async fn finish(
        self,
        status: StatusCode,
        headers: &HeaderMap,
        body: Recorded,
        keep: Keep,
    ) -> Result<Finished, StoreError> {
        let kept = self.replayable_headers(headers);
        self.finish_with(status, kept, body, keep).await
    }

    /// The headers of a response that its replay would carry, made ready to store
    /// ([`StoredResponse::compact_headers`]): taken when the response head is handed on,
    /// so that [`Execution::finish_with`] needs no copy of the whole header map.
    pub fn replayable_headers(&self, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
        StoredResponse::compact_headers(headers, |n| self.policy.replays_header(n))
    }

    /// [`Execution::finish`] with the headers already taken by
    /// [`Execution::replayable_headers`].
    pub async fn finish_with(
        mut self,
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Recorded,
        keep: Keep,
    ) -> Result<Finished, StoreError> {
        self.started = true;
        self.renewer.abort();
        if keep == Keep::Nothing || !self.policy.should_store(status) {
            return self.release().await;
        }
        let response = StoredResponse::new(status.as_u16(), headers, body, self.request_id.clone());
        let stored = self
            .store
            .complete(&self.record_key, self.token, &response, self.policy.ttl)
            .await?;
        if !stored {
            tracing::warn!(key = %self.key, route = %self.record_key.route, "outcome refused: the lease was lost");
            return Ok(Finished::Fenced);
        }
        self.settle(Some(self.policy.ttl)).await;
        Ok(Finished::Stored)
    }

    /// Ends the tenant's in-flight count of this record (if caps are set). A failure
    /// only delays it: the slot expires with the lease.
    async fn settle(&self, kept: Option<Duration>) {
        if self.limits.is_unlimited() {
            return;
        }
        if let Err(e) = self.limits.settle(&self.record_key, kept).await {
            tracing::warn!(error = %e, route = %self.record_key.route, "could not settle the tenant's count");
        }
    }

    /// Releases the key: nothing was executed (or the outcome must not be kept), so a
    /// retry may run.
    pub async fn release(mut self) -> Result<Finished, StoreError> {
        self.started = true;
        self.renewer.abort();
        if !self.store.release(&self.record_key, self.token).await? {
            return Ok(Finished::Fenced);
        }
        self.settle(None).await;
        Ok(Finished::Released)
    }
}

/// Spawns `task` in the current span (the request's), so that its log lines name
/// the request.
fn spawn_in_span<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(task.in_current_span())
}

/// What a running execution renews, and for how long: its lease, and (with tenant
/// caps) its tenant's count of the record.
struct Renewal {
    /// Each renewal extends the lease to now + `lease`; one is sent every third of it.
    lease: Duration,
    /// The record's retention, which the tenant's record count is renewed with.
    ttl: Duration,
    /// The tenant caps, and the store that counts them.
    limits: TenantCaps,
}

/// Renews the lease of `key` (and the tenant's counts) until aborted; marks the
/// execution `lost` and stops when another token holds the key.
async fn renew_loop<S: Store>(
    store: Arc<S>,
    key: RecordKey,
    token: FencingToken,
    renewal: Renewal,
    lost: Arc<AtomicBool>,
) {
    let Renewal { lease, ttl, limits } = renewal;
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match store.renew(&key, token, lease).await {
            Ok(true) if limits.is_unlimited() => {}
            // The tenant's in-flight count of this record lives as long as its lease.
            Ok(true) => {
                if let Err(e) = limits.admit(&key, lease, ttl).await {
                    tracing::warn!(error = %e, route = %key.route, "tenant count renewal failed");
                }
            }
            Ok(false) => {
                lost.store(true, Ordering::Relaxed);
                tracing::warn!(route = %key.route, "lease lost while executing");
                return;
            }
            // A failed renewal is retried at the next tick; the lease covers two misses.
            Err(e) => tracing::warn!(error = %e, route = %key.route, "lease renewal failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyRules;

    fn replay(
        headers: Vec<(&'static str, &'static str)>,
        request_id: Option<&str>,
    ) -> Response<Bytes> {
        Replay {
            response: StoredResponse {
                status: 200,
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                    .collect(),
                body: Bytes::from_static(b"{}"),
                body_kept: BodyKept::Whole,
                request_id: request_id.map(str::to_owned),
            },
            key: IdempotencyKey::parse(b"k-1", &KeyRules::default()).unwrap(),
            error_format: ErrorFormat::Problem,
            key_header: KEY_HEADER,
        }
        .into_response()
    }

    #[test]
    fn replay_keeps_the_request_id_the_first_caller_saw() {
        // The upstream answered with its own id: the replay carries that one, not the
        // id of the request (which the first caller never saw).
        let res = replay(
            vec![("x-request-id", "req_original_123")],
            Some("3f1c0c2e-proxy-minted"),
        );
        assert_eq!(res.headers()["x-request-id"], "req_original_123");
        assert_eq!(res.headers().get_all("x-request-id").iter().count(), 1);
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        assert_eq!(res.headers()["idempotency-key"], "k-1");
    }

    #[test]
    fn replay_falls_back_to_the_original_request_id() {
        let res = replay(vec![("content-type", "application/json")], Some("req-1"));
        assert_eq!(res.headers()["x-request-id"], "req-1");
        let res = replay(vec![], None);
        assert!(res.headers().get("x-request-id").is_none());
    }
}
