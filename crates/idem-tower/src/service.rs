use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use idem_core::policy::{ErrorFormat, KeyRequirement};
use idem_core::{
    Decision, Detached, Engine, Execution, Finished, Keep, PassReason, Policy, Problem,
    ProblemKind, Recorded, Rejection, Routes, Store, Wakeups, panic_message,
};
use tower::Service;
use tracing::Instrument;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::future::ResponseFuture;
use crate::{NoStore, Outcome, OutcomeUnknown};

/// The middleware produced by [`IdempotencyLayer`](crate::IdempotencyLayer).
#[derive(Debug)]
pub struct Idempotency<S, St> {
    pub(crate) inner: S,
    pub(crate) engine: Engine<St>,
    pub(crate) routes: Arc<Routes>,
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            engine: self.engine.clone(),
            routes: self.routes.clone(),
        }
    }
}

impl<S, St> Idempotency<S, St> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn respond<B>(mut res: Response<Bytes>, outcome: Outcome) -> Response<ResponseBody<B>> {
    res.extensions_mut().insert(outcome);
    res.map(ResponseBody::full)
}

fn reject<B>(rejection: &Rejection, format: ErrorFormat) -> Response<ResponseBody<B>> {
    respond(
        rejection.to_response(format),
        Outcome::Rejected(rejection.kind()),
    )
}

fn has_key(policy: &Policy, headers: &HeaderMap) -> bool {
    policy.header_names.iter().any(|n| headers.contains_key(n))
}

/// Why a request idem has nothing to do with passes through unread, if it does.
fn pass_reason<B>(policy: &Policy, req: &Request<B>) -> Option<PassReason> {
    if !policy.protects(req.method()) {
        Some(PassReason::NotProtected)
    } else if policy.key != KeyRequirement::Required && !has_key(policy, req.headers()) {
        Some(PassReason::NoKey)
    } else {
        None
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Wakeups,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Take the service that was driven to readiness and leave a fresh clone behind,
        // since the call happens later, inside the future.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let resolved = self.routes.lookup(req.method(), req.uri().path());
        // Requests idem has nothing to do with stream through without being read.
        if let Some(reason) = pass_reason(resolved.policy(), &req) {
            let fut = inner.call(req.map(RequestBody::stream));
            return ResponseFuture {
                inner: Box::pin(async move { Ok(passed(fut.await?, reason)) }),
            };
        }
        let policy = resolved.policy().clone();
        let route = resolved.id(req.method(), req.uri().path());
        let engine = self.engine.clone();
        ResponseFuture {
            inner: Box::pin(protect(inner, engine, policy, route, req)),
        }
    }
}

/// The request and response bodies the layer reads and records.
trait HttpBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

impl<T> HttpBody for T where T: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

/// The inner service's response to a request that passed through unprotected.
fn passed<B>(mut res: Response<B>, reason: PassReason) -> Response<ResponseBody<B>> {
    res.extensions_mut().insert(Outcome::Passed(reason));
    res.map(ResponseBody::inner)
}

/// A request with a key on a protected method: its body read, then the engine's
/// decision carried out.
async fn protect<S, St, ReqBody, ResBody>(
    mut inner: S,
    engine: Engine<St>,
    policy: Arc<Policy>,
    route: String,
    req: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Wakeups,
    ReqBody: HttpBody,
    ResBody: HttpBody,
{
    let (parts, body) = req.into_parts();
    let bytes = match read_body(&policy, &parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(rejection) => {
            let mut res = reject(&rejection, policy.error_format);
            if let Rejection::BodyTimeout { .. } = rejection {
                // The rest of the body may still be on its way: do not reuse the
                // connection.
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return Ok(res);
        }
    };
    match engine.begin(&policy, &route, &parts, &bytes).await {
        Decision::Pass(reason) => {
            let req = Request::from_parts(parts, RequestBody::full(bytes));
            Ok(passed(inner.call(req).await?, reason))
        }
        Decision::Reject(rejection, format) => Ok(reject(&rejection, format)),
        Decision::Replay(replay) => Ok(respond(replay.into_response(), Outcome::Replayed)),
        Decision::Execute(exec) => {
            let req = Request::from_parts(parts, RequestBody::full(bytes));
            execute(inner, exec, req, &policy).await
        }
    }
}

/// Buffers the request body, within the route's `max_request_bytes` and
/// `body_read_timeout`.
async fn read_body<B>(policy: &Policy, headers: &HeaderMap, body: B) -> Result<Bytes, Rejection>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large = Rejection::RequestTooLarge {
        limit: policy.max_request_bytes,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > policy.max_request_bytes as u64) {
        return Err(too_large);
    }
    let read = tokio::time::timeout(
        policy.body_read_timeout,
        Limited::new(body, policy.max_request_bytes).collect(),
    );
    match read.await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large),
        Err(_) => Err(Rejection::BodyTimeout {
            after: policy.body_read_timeout,
        }),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "request body could not be read");
            Err(Rejection::BodyUnreadable)
        }
    }
}

/// Runs the handler under the claimed key, in the caller's task but [`Detached`]: a
/// caller that goes away must not cancel work that has begun, whose outcome must be
/// kept, so what is left of it then runs in a task of its own. If nobody takes the
/// response, dropping it stores it (`Recorder`).
async fn execute<S, St, ReqBody, ResBody>(
    mut inner: S,
    mut exec: Execution<St>,
    mut req: Request<RequestBody<ReqBody>>,
    policy: &Policy,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>, Error: Send>,
    S: Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    St: Store,
    ResBody: HttpBody,
{
    req.extensions_mut().insert(exec.key().clone());
    let cap = policy.max_response_bytes;
    // Run to its end even if the caller leaves (spawned then), in the request's span,
    // so that the handler's log lines name the request.
    let handled = Detached::new(async move {
        exec.mark_started();
        let res = inner.call(req).await?;
        Ok(record(res, exec, cap).await)
    });
    match handled.await {
        Ok(result) => result,
        Err(panic) => {
            // The execution was dropped with the handler, so the key stays in flight
            // until its lease expires (the handler may have done part of its work).
            tracing::error!(error = panic_message(&panic), "the handler panicked");
            let problem = Problem::of(
                ProblemKind::HandlerFailed,
                "the request failed while executing; its outcome is unknown. \
                 Retry with the same key after the lease expires",
            );
            Ok(respond(
                problem.to_response(policy.error_format),
                Outcome::Unknown,
            ))
        }
    }
}

/// Wraps an executed response so that its outcome is stored (or released, or left in
/// flight) once its body has been delivered. A response sent without a body is
/// handed over only once its outcome is stored.
async fn record<B, St>(
    res: Response<B>,
    exec: Execution<St>,
    cap: usize,
) -> Response<ResponseBody<B>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    St: Store,
{
    let (mut head, body) = res.into_parts();
    if head.extensions.remove::<OutcomeUnknown>().is_some() {
        // Neither stored nor released: the lease runs out (SPEC §6).
        drop(exec);
        head.extensions.insert(Outcome::Unknown);
        return Response::from_parts(head, ResponseBody::inner(body));
    }
    let keep = match head.extensions.remove::<NoStore>() {
        Some(NoStore) => Keep::Nothing,
        None => Keep::AsPolicy,
    };
    head.extensions.insert(Outcome::Executed);
    // The headers a replay carries, taken now: the head goes to the caller.
    let (status, headers) = (head.status, exec.replayable_headers(&head.headers));
    // Storing may end in a task of its own (the caller went away): it keeps the
    // request's span, so that its log lines name the request.
    let span = tracing::Span::current();
    let finish: crate::body::Finisher = Box::new(move |body| {
        Box::pin(
            async move {
                match exec.finish_with(status, headers, body, keep).await {
                    // Logged by the engine; another execution holds the key now.
                    Ok(Finished::Fenced) => false,
                    Ok(_) => true,
                    Err(e) => {
                        tracing::error!(error = %e, "the outcome could not be stored");
                        false
                    }
                }
            }
            .instrument(span),
        )
    });
    // (HEAD is never protected, policies refuse it: here only the status says whether
    // the answer has a body.)
    if !can_have_body(head.status) {
        // hyper drops such a body without polling it: nothing would wait for the
        // store before the caller has the whole response, and a retry sent right
        // after it would find the key still in flight. Store first. (A failure to
        // store is logged; the response cannot be delivered "not whole".)
        drop(body);
        finish(Recorded::Whole(Bytes::new())).await;
        return Response::from_parts(head, ResponseBody::full(Bytes::new()));
    }
    Response::from_parts(head, ResponseBody::recording(body, cap, finish))
}

/// Whether a response with this status may carry a body (RFC 9110 §6.4.1: 1xx, 204
/// and 304 never do).
fn can_have_body(status: http::StatusCode) -> bool {
    !(status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, Full};
    use idem_core::store::{ClaimSpec, DynStore};
    use idem_core::{
        Claim, FencingToken, Record, RecordKey, RecordState, StoreError, StoreErrorKind,
        StoredResponse, TenantCounting, TenantSecret,
    };
    use idem_store_memory::MemoryStore;
    use tokio::sync::Semaphore;
    use tower::{Layer, ServiceExt};

    use super::*;

    /// A memory store with the faults of a remote one: `complete` failing (the store
    /// went down while the handler ran), or a claim or `complete` that has to wait
    /// (pool checkout, reconnect) until the test opens its gate.
    struct Faulty {
        /// Shared by the instances of a test (as a store shared by two processes).
        inner: Arc<dyn DynStore>,
        complete_fails: bool,
        /// Held after the claim applied, before it answers.
        claim_gate: Option<Semaphore>,
        /// Held before `complete` is sent.
        complete_gate: Option<Semaphore>,
        /// `admit` applies, then answers an error (the answer was lost on its way).
        admit_answer_lost: bool,
    }

    impl Default for Faulty {
        fn default() -> Self {
            Faulty {
                inner: Arc::new(MemoryStore::new()),
                complete_fails: false,
                claim_gate: None,
                complete_gate: None,
                admit_answer_lost: false,
            }
        }
    }

    async fn pass(gate: &Option<Semaphore>) {
        if let Some(g) = gate {
            drop(g.acquire().await.unwrap());
        }
    }

    impl Store for Faulty {
        async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
            let claimed = Store::claim(&self.inner, key, spec).await;
            pass(&self.claim_gate).await;
            claimed
        }
        async fn complete(
            &self,
            key: &RecordKey,
            token: FencingToken,
            response: &StoredResponse,
            ttl: Duration,
        ) -> Result<bool, StoreError> {
            if self.complete_fails {
                return Err(StoreError::msg(StoreErrorKind::Unavailable, "store down"));
            }
            pass(&self.complete_gate).await;
            Store::complete(&self.inner, key, token, response, ttl).await
        }
        idem_core::forward_store!(inner => reclaim, release, renew, get, delete, purge_expired, ping);
    }

    impl TenantCounting for Faulty {
        async fn admit(
            &self,
            key: &RecordKey,
            limits: idem_core::TenantLimits,
            lease: Duration,
            ttl: Duration,
        ) -> Result<idem_core::Admission, StoreError> {
            let admitted = TenantCounting::admit(&self.inner, key, limits, lease, ttl).await;
            if self.admit_answer_lost {
                return Err(StoreError::msg(
                    StoreErrorKind::Unavailable,
                    "connection reset",
                ));
            }
            admitted
        }
        idem_core::forward_store!(inner => settle);
    }

    impl Wakeups for Faulty {
        idem_core::forward_store!(inner => watch);
    }

    const SECRET: &[u8] = b"a-test-secret-of-enough-length";

    fn layer(store: Faulty) -> crate::IdempotencyLayer<Faulty> {
        crate::IdempotencyLayer::new(store, TenantSecret::new(SECRET.to_vec()).unwrap())
    }

    /// A handler that answers 201 "charged", counting its executions.
    fn charges(
        executed: Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl Service<
        Request<RequestBody<Full<Bytes>>>,
        Response = Response<Full<Bytes>>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
            executed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(201)
                        .body(Full::new(Bytes::from_static(b"charged")))
                        .unwrap(),
                )
            }
        })
    }

    fn charge(key: &str) -> Request<Full<Bytes>> {
        Request::post("/v1/charges")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    /// The record of `key` for the anonymous caller of [`charge`].
    async fn record_of(layer: &crate::IdempotencyLayer<Faulty>, key: &str) -> Option<Record> {
        let engine = layer.engine();
        let tenant = engine.tenants().tenant_of(&http::HeaderMap::new());
        let record_key = RecordKey::new(tenant, "POST /v1/charges", key);
        engine.store().get(&record_key).await.unwrap()
    }

    /// Polls `check` every 10 ms for up to 2 s.
    async fn eventually<F: std::future::Future<Output = bool>>(
        mut check: impl FnMut() -> F,
    ) -> bool {
        for _ in 0..200 {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    // Found by idem-chaos (store crash under load): the caller got the whole response
    // although its outcome was never stored, and the retry executed again.
    #[tokio::test]
    async fn a_response_whose_outcome_was_not_stored_is_not_delivered_whole() {
        let layer = layer(Faulty {
            complete_fails: true,
            ..Faulty::default()
        });
        let svc = layer.layer(charges(Default::default()));
        let res = svc.oneshot(charge("k1")).await.unwrap();
        assert_eq!(res.status(), 201);
        assert!(
            res.into_body().collect().await.is_err(),
            "the body must break off: a retry could not replay it"
        );
    }

    /// hyper neither polls nor sends the body of a 204 or a 304: it drops it. The
    /// outcome of such a response must be stored before the
    /// response is handed over, or a retry sent right after it finds the key still in
    /// flight (seen as a 409 in the sidecar's `responses_without_a_body_are_stored`).
    #[tokio::test]
    async fn a_response_without_a_body_is_handed_over_once_its_outcome_is_stored() {
        let layer = layer(Faulty {
            complete_gate: Some(Semaphore::new(0)),
            ..Faulty::default()
        });
        let svc = layer.clone().layer(tower::service_fn(
            |_req: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(204)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            },
        ));
        let first = tokio::spawn(svc.clone().oneshot(charge("k-204")));
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            !first.is_finished(),
            "a 204 was handed over before its outcome was stored"
        );
        let store = layer.engine().store().clone();
        store.complete_gate.as_ref().unwrap().add_permits(1);
        let res = first.await.unwrap().unwrap();
        assert_eq!(res.status(), 204);
        // As hyper does: the body is dropped, never polled.
        drop(res);
        let retry = svc.oneshot(charge("k-204")).await.unwrap();
        assert_eq!(retry.status(), 204);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
    }

    /// The caller goes away while the outcome is being stored (its body is dropped in
    /// the middle of `complete`, as hyper does on a reset): the outcome is still stored.
    #[tokio::test]
    async fn a_caller_leaving_while_the_outcome_is_stored_does_not_lose_it() {
        let layer = layer(Faulty {
            complete_gate: Some(Semaphore::new(0)),
            ..Faulty::default()
        });
        let executed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let svc = layer.clone().layer(charges(executed.clone()));
        let res = svc.oneshot(charge("k-storing")).await.unwrap();
        let mut body = res.into_body();
        // The whole body was read from the handler; the end waits for the store.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), body.frame())
                .await
                .is_err(),
            "the end of the body waits until the outcome is stored"
        );
        drop(body);
        let store = layer.engine().store().clone();
        store.complete_gate.as_ref().unwrap().add_permits(1);
        assert!(
            eventually(|| async {
                matches!(
                    record_of(&layer, "k-storing").await,
                    Some(Record {
                        state: RecordState::Completed(_),
                        ..
                    })
                )
            })
            .await,
            "the outcome was dropped with the caller: {:?}",
            record_of(&layer, "k-storing").await
        );
        assert_eq!(executed.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// An admission whose answer was lost (applied in the store, an error to the
    /// engine): the request is refused and its key released, and the tenant's slot is
    /// given back too, not held until the record cap's window ends.
    #[tokio::test]
    async fn an_admission_whose_answer_was_lost_gives_its_slot_back() {
        let executed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let lossy = layer(Faulty {
            admit_answer_lost: true,
            ..Faulty::default()
        })
        .with_tenant_limits(idem_core::TenantLimits::new(None, Some(1)));
        let svc = lossy.clone().layer(charges(executed.clone()));
        let res = svc.oneshot(charge("k-lost")).await.unwrap();
        assert_eq!(res.status(), 503, "the store failed after it answered");
        assert!(
            record_of(&lossy, "k-lost").await.is_none(),
            "the key is released"
        );
        // The same store, answering again: the tenant's one record slot must be free.
        let engine = lossy.engine();
        let healthy = crate::IdempotencyLayer::from_engine(
            idem_core::Engine::new(
                Arc::new(Faulty {
                    inner: engine.store().inner.clone(),
                    ..Faulty::default()
                }),
                engine.tenants().clone(),
            )
            .with_tenant_limits(idem_core::TenantLimits::new(None, Some(1))),
        );
        let svc = healthy.layer(charges(executed.clone()));
        let res = svc.oneshot(charge("k-next")).await.unwrap();
        assert_eq!(
            res.status(),
            201,
            "the lost admission still holds the tenant's only slot"
        );
        assert_eq!(executed.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// The caller goes away while its claim is on its way to the store: the claim
    /// applies, nothing executes, and the key is released instead of held for the
    /// lease (or, with `on_abandoned = "reject"`, the whole retention).
    #[tokio::test]
    async fn a_claim_whose_caller_left_is_released() {
        let layer = layer(Faulty {
            claim_gate: Some(Semaphore::new(0)),
            ..Faulty::default()
        });
        let executed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let svc = layer.clone().layer(charges(executed.clone()));
        let left =
            tokio::time::timeout(Duration::from_millis(100), svc.oneshot(charge("k-gone"))).await;
        assert!(left.is_err(), "the caller left during the claim");
        assert!(
            record_of(&layer, "k-gone").await.is_some(),
            "the claim applied"
        );
        layer
            .engine()
            .store()
            .claim_gate
            .as_ref()
            .unwrap()
            .add_permits(1);
        assert!(
            eventually(|| async { record_of(&layer, "k-gone").await.is_none() }).await,
            "the claim of a request that never ran stays held: {:?}",
            record_of(&layer, "k-gone").await
        );
        assert_eq!(executed.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// The line of the log file `logs` that holds `message`.
    fn line(logs: &tempfile::NamedTempFile, message: &str) -> String {
        let text = std::fs::read_to_string(logs.path()).unwrap();
        text.lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("no log line says {message:?} in:\n{text}"))
            .to_owned()
    }

    /// The handler runs in a task of its own and the outcome may be stored from
    /// another: their log lines still carry the request's span (and so its id).
    #[tokio::test]
    async fn log_lines_of_the_handler_and_of_storing_carry_the_request_span() {
        let logs = tempfile::NamedTempFile::new().unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Arc::new(logs.reopen().unwrap()))
            .with_ansi(false)
            .finish();
        // The test's runtime has one thread: the spawned tasks log through it too.
        let _default = tracing::subscriber::set_default(subscriber);
        let layer = layer(Faulty {
            complete_fails: true,
            ..Faulty::default()
        });
        let handler = tower::service_fn(|_req: Request<RequestBody<Full<Bytes>>>| async {
            tracing::info!("the handler ran");
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"x"))))
        });
        let span = tracing::info_span!("request", request_id = "req-span-42");
        let res = layer
            .layer(handler)
            .oneshot(charge("k-span"))
            .instrument(span)
            .await
            .unwrap();
        // Read outside the request's span, as a server does.
        assert!(res.into_body().collect().await.is_err());
        assert!(line(&logs, "the handler ran").contains("req-span-42"));
        assert!(line(&logs, "the outcome could not be stored").contains("req-span-42"));
    }
}
