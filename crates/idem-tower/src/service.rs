use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use idem_core::policy::{ErrorFormat, KeyRequirement};
use idem_core::{
    Decision, Engine, Execution, Finished, PassReason, Policy, Problem, Rejection, Routes, Store,
    Wakeups,
};
use tower::Service;

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
        Outcome::Rejected(rejection.slug()),
    )
}

fn has_key(policy: &Policy, headers: &http::HeaderMap) -> bool {
    policy.header_names.iter().any(|n| headers.contains_key(n))
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
        let policy = resolved.policy().clone();

        // Requests idem has nothing to do with stream through without being read.
        let pass = if !policy.protects(req.method()) {
            Some(PassReason::NotProtected)
        } else if policy.key != KeyRequirement::Required && !has_key(&policy, req.headers()) {
            Some(PassReason::NoKey)
        } else {
            None
        };
        if let Some(reason) = pass {
            let fut = inner.call(req.map(|body| RequestBody::Stream { body }));
            return ResponseFuture {
                inner: Box::pin(async move {
                    let mut res = fut.await?;
                    res.extensions_mut().insert(Outcome::Passed(reason));
                    Ok(res.map(|body| ResponseBody::Inner { body }))
                }),
            };
        }

        let route = resolved.id(req.method(), req.uri().path());
        let engine = self.engine.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                let (parts, body) = req.into_parts();
                let too_large = Rejection::RequestTooLarge {
                    limit: policy.max_request_bytes,
                };
                let declared = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if declared.is_some_and(|n| n > policy.max_request_bytes as u64) {
                    return Ok(reject(&too_large, policy.error_format));
                }
                let read = tokio::time::timeout(
                    policy.body_read_timeout,
                    Limited::new(body, policy.max_request_bytes).collect(),
                );
                let bytes = match read.await {
                    Ok(Ok(collected)) => collected.to_bytes(),
                    Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                        return Ok(reject(&too_large, policy.error_format));
                    }
                    Err(_) => {
                        let problem = Problem::new(
                            http::StatusCode::REQUEST_TIMEOUT,
                            "request-body-timeout",
                            "Request body too slow",
                            format!(
                                "the request body did not arrive within {} s; nothing was executed",
                                policy.body_read_timeout.as_secs_f64()
                            ),
                        );
                        let mut res = respond(
                            problem.to_response(policy.error_format),
                            Outcome::Rejected(problem.slug),
                        );
                        // The rest of the body may still be on its way: do not reuse
                        // the connection.
                        res.headers_mut()
                            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                        return Ok(res);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "request body could not be read");
                        let problem = Problem::new(
                            http::StatusCode::BAD_REQUEST,
                            "request-body-unreadable",
                            "Request body unreadable",
                            "the request body could not be read to the end; nothing was executed",
                        );
                        return Ok(respond(
                            problem.to_response(policy.error_format),
                            Outcome::Rejected(problem.slug),
                        ));
                    }
                };
                match engine.begin(&policy, &route, &parts, &bytes).await {
                    Decision::Pass(reason) => {
                        let mut res = inner
                            .call(Request::from_parts(parts, RequestBody::full(bytes)))
                            .await?;
                        res.extensions_mut().insert(Outcome::Passed(reason));
                        Ok(res.map(|body| ResponseBody::Inner { body }))
                    }
                    Decision::Reject(rejection, format) => Ok(reject(&rejection, format)),
                    Decision::Replay(replay) => {
                        Ok(respond(replay.into_response(), Outcome::Replayed))
                    }
                    Decision::Execute(mut exec) => {
                        let mut req = Request::from_parts(parts, RequestBody::full(bytes));
                        req.extensions_mut().insert(exec.key().clone());
                        let cap = policy.max_response_bytes;
                        // The handler runs in a task of its own: a caller that goes away
                        // must not cancel work that has begun, whose outcome must be kept.
                        // If nobody takes the response, dropping it stores it (`Recorder`).
                        let task = tokio::spawn(async move {
                            exec.mark_started();
                            let res = inner.call(req).await?;
                            Ok(record(res, exec, cap))
                        });
                        match task.await {
                            Ok(result) => result,
                            Err(e) => {
                                // A panic: the execution was dropped with the task, so the
                                // key stays in flight until its lease expires (the handler
                                // may have done part of its work).
                                tracing::error!(error = %e, "the handler panicked");
                                let problem = Problem::new(
                                    http::StatusCode::INTERNAL_SERVER_ERROR,
                                    "handler-failed",
                                    "Handler failed",
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
                }
            }),
        }
    }
}

/// Wraps an executed response so that its outcome is stored (or released, or left in
/// flight) once its body has been delivered.
fn record<B, St>(res: Response<B>, exec: Execution<St>, cap: usize) -> Response<ResponseBody<B>>
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
        return Response::from_parts(head, ResponseBody::Inner { body });
    }
    let store = head.extensions.remove::<NoStore>().is_none();
    head.extensions.insert(Outcome::Executed);
    let (status, headers) = (head.status, head.headers.clone());
    let finish: crate::body::Finisher = Box::new(move |body| {
        Box::pin(async move {
            match exec.finish(status, &headers, body, store).await {
                // Logged by the engine; another execution holds the key now.
                Ok(Finished::Fenced) => false,
                Ok(_) => true,
                Err(e) => {
                    tracing::error!(error = %e, "the outcome could not be stored");
                    false
                }
            }
        })
    });
    Response::from_parts(head, ResponseBody::recording(body, cap, finish))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, Full};
    use idem_core::store::ClaimSpec;
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
    #[derive(Default)]
    struct Faulty {
        inner: Arc<MemoryStore>,
        complete_fails: bool,
        /// Held after the claim applied, before it answers.
        claim_gate: Option<Semaphore>,
        /// Held before `complete` is sent.
        complete_gate: Option<Semaphore>,
        /// `admit` applies, then answers an error (the answer was lost on its way).
        admit_answer_lost: bool,
    }

    async fn pass(gate: &Option<Semaphore>) {
        if let Some(g) = gate {
            drop(g.acquire().await.unwrap());
        }
    }

    impl Store for Faulty {
        async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
            let claimed = self.inner.claim(key, spec).await;
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
            self.inner.complete(key, token, response, ttl).await
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
            let admitted = self.inner.admit(key, limits, lease, ttl).await;
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
}
