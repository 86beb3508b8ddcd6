use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use idem_core::policy::{ErrorFormat, KeyRequirement};
use idem_core::{
    Decision, Engine, Execution, Finished, PassReason, Policy, Problem, Rejection, Routes, Store,
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
    St: Store,
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
        let (route, policy) = self.routes.resolve(req.method(), req.uri().path());
        let policy = policy.clone();

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
                    Decision::Execute(exec) => {
                        let mut req = Request::from_parts(parts, RequestBody::full(bytes));
                        req.extensions_mut().insert(exec.key().clone());
                        let cap = policy.max_response_bytes;
                        // The handler runs in a task of its own: a caller that goes away
                        // must not cancel work that has begun, whose outcome must be kept.
                        // If nobody takes the response, dropping it stores it (`Recorder`).
                        let task = tokio::spawn(async move {
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
        Claim, FencingToken, Lease, Record, RecordKey, StoreError, StoreErrorKind, StoredResponse,
        TenantSecret,
    };
    use idem_store_memory::MemoryStore;
    use tower::{Layer, ServiceExt};

    use super::*;

    /// A memory store whose `complete` fails, as a store that went down while the
    /// handler ran.
    struct CompleteFails(MemoryStore);

    impl Store for CompleteFails {
        async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
            self.0.claim(key, spec).await
        }
        async fn reclaim(
            &self,
            key: &RecordKey,
            stale: FencingToken,
            spec: ClaimSpec<'_>,
        ) -> Result<Option<Lease>, StoreError> {
            self.0.reclaim(key, stale, spec).await
        }
        async fn complete(
            &self,
            _: &RecordKey,
            _: FencingToken,
            _: &StoredResponse,
            _: Duration,
        ) -> Result<bool, StoreError> {
            Err(StoreError::msg(StoreErrorKind::Unavailable, "store down"))
        }
        async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<bool, StoreError> {
            self.0.release(key, token).await
        }
        async fn renew(
            &self,
            key: &RecordKey,
            token: FencingToken,
            lease: Duration,
        ) -> Result<bool, StoreError> {
            self.0.renew(key, token, lease).await
        }
        async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
            self.0.get(key).await
        }
        async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
            self.0.delete(key).await
        }
        async fn purge_expired(&self) -> Result<u64, StoreError> {
            self.0.purge_expired().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.0.ping().await
        }
    }

    // Found by idem-chaos (store crash under load): the caller got the whole response
    // although its outcome was never stored, and the retry executed again.
    #[tokio::test]
    async fn a_response_whose_outcome_was_not_stored_is_not_delivered_whole() {
        let layer = crate::IdempotencyLayer::<CompleteFails>::new(
            CompleteFails(MemoryStore::new()),
            TenantSecret::new(b"a-test-secret-of-enough-length".to_vec()).unwrap(),
        );
        let svc = layer.layer(tower::service_fn(
            |_req: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(201)
                        .body(Full::new(Bytes::from_static(b"charged")))
                        .unwrap(),
                )
            },
        ));
        let req = Request::post("/v1/charges")
            .header("idempotency-key", "k1")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 201);
        assert!(
            res.into_body().collect().await.is_err(),
            "the body must break off: a retry could not replay it"
        );
    }
}
