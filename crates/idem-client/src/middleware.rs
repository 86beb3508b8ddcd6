//! The reqwest face: a [`reqwest_middleware::Middleware`].

use std::ops::ControlFlow;

use http::Extensions;
use reqwest::{Request, Response, ResponseBuilderExt};
use reqwest_middleware::{Middleware, Next};

use crate::key::IdempotencyKey;
use crate::policy::RetryPolicy;
use crate::run::{AttemptError, Resend, Run};

/// Gives every `POST`/`PATCH` request (the policy's methods) an idempotency key and
/// retries it safely; see the crate docs.
///
/// The key is the request's own `Idempotency-Key` header when it has a valid one, else
/// an [`IdempotencyKey`] put in the request's extensions
/// (`RequestBuilder::with_extension`), else a fresh UUID v4. Every attempt carries the
/// same key. The key is also put in the extensions of the response.
///
/// A final answer of 1xx–3xx (a replay included) is returned as it is. Anything else
/// comes back as an [`Error`](crate::Error) inside
/// [`reqwest_middleware::Error::Middleware`]; get it with
/// [`Error::from_middleware`](crate::Error::from_middleware). A transport error that is
/// not worth retrying (e.g. a request that cannot be built) comes back unwrapped, as
/// reqwest gave it.
///
/// A response with a `Content-Length` of at most
/// [`RetryPolicy::read_body_up_to`] (8 MiB) is read to the end within its attempt: a
/// body that breaks off is retried with the same key, so the caller never holds half an
/// answer the server may replay whole.
///
/// A request whose body is a stream cannot be sent twice: it is sent once, and if that
/// attempt needed a retry the error is [`Error::NotRepeatable`](crate::Error::NotRepeatable).
#[derive(Debug, Clone)]
pub struct IdempotencyMiddleware {
    policy: RetryPolicy,
}

impl IdempotencyMiddleware {
    /// A middleware with `policy`.
    ///
    /// # Panics
    /// If the policy is invalid; call [`RetryPolicy::validate`] first to handle the error.
    pub fn new(policy: RetryPolicy) -> Self {
        let policy = policy
            .validate()
            .unwrap_or_else(|e| panic!("invalid retry policy: {e}"));
        IdempotencyMiddleware { policy }
    }

    /// The retry policy every request through this middleware follows.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl Default for IdempotencyMiddleware {
    fn default() -> Self {
        Self::new(RetryPolicy::default())
    }
}

impl IdempotencyMiddleware {
    /// The request's key: the one it carries, else the caller's (in the extensions)
    /// or a new one, then set in the policy's header. `None` when the key it carries
    /// is not a usable one.
    fn key_of(&self, req: &mut Request, extensions: &Extensions) -> Option<IdempotencyKey> {
        let header = &self.policy.header;
        if let Some(value) = req.headers().get(header) {
            return IdempotencyKey::from_header(value);
        }
        let key = extensions
            .get::<IdempotencyKey>()
            .cloned()
            .unwrap_or_else(IdempotencyKey::generate);
        req.headers_mut()
            .insert(header.clone(), key.to_header_value());
        Some(key)
    }
}

#[async_trait::async_trait]
impl Middleware for IdempotencyMiddleware {
    async fn handle(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.policy.applies_to(req.method()) {
            return next.run(req, extensions).await;
        }
        let Some(key) = self.key_of(&mut req, extensions) else {
            // Not ours to fix: the server answers 400 and that is final.
            return next.run(req, extensions).await;
        };
        let resend = match req.try_clone() {
            Some(_) => Resend::Possible,
            None => Resend::Impossible,
        };
        let mut run = Run::new(&self.policy, key, resend);
        let mut req = Some(req);
        loop {
            let attempt = run.begin();
            let mut this = if resend == Resend::Possible {
                req.as_ref()
                    .and_then(Request::try_clone)
                    .expect("checked: the request can be cloned")
            } else {
                req.take().expect("a streaming request has one attempt")
            };
            // The transport stops waiting when the attempt's time is up, body included;
            // a shorter timeout set by the caller on the request stays.
            let timeout = this.timeout_mut();
            *timeout = Some(timeout.map_or(attempt.timeout, |t| t.min(attempt.timeout)));
            let exchange = async {
                let res = next.clone().run(this, extensions).await?;
                read_ahead(res, self.policy.read_body_up_to).await
            };
            let result = match tokio::time::timeout(attempt.timeout, exchange).await {
                Ok(Ok(res)) => Ok(res),
                Ok(Err(e)) => Err(AttemptError::Transport(e)),
                Err(_) => Err(AttemptError::TimedOut(attempt.timeout)),
            };
            if let ControlFlow::Break(outcome) = run.settle(result).await {
                return match outcome {
                    Ok(mut res) => {
                        res.extensions_mut().insert(run.key().clone());
                        Ok(res)
                    }
                    Err(crate::Error::Transport { source, .. }) => Err(source),
                    Err(e) => Err(reqwest_middleware::Error::middleware(e)),
                };
            }
        }
    }
}

/// Reads a sized body of at most `limit` bytes to the end, so that a body that breaks
/// off fails the attempt (and is retried) instead of reaching the caller. The response
/// keeps its status, version, headers, URL and extensions.
async fn read_ahead(mut res: Response, limit: u64) -> reqwest_middleware::Result<Response> {
    if res.content_length().is_none_or(|n| n > limit) {
        return Ok(res);
    }
    let mut head = http::Response::builder()
        .status(res.status())
        .version(res.version())
        .url(res.url().clone());
    if let Some(headers) = head.headers_mut() {
        *headers = res.headers().clone();
    }
    let extensions = std::mem::take(res.extensions_mut());
    let body = res.bytes().await?;
    let mut read = head
        .body(body)
        .expect("status, version and headers come from a valid response");
    read.extensions_mut().extend(extensions);
    Ok(Response::from(read))
}
