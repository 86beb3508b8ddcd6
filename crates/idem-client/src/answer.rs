//! What one attempt produces, whatever the HTTP client: an answer (status, headers,
//! body) or a transport error that knows whether it is worth retrying.

use std::future::Future;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;

/// An HTTP answer, as the retry loop needs to see it.
///
/// Implemented for [`http::Response`] (any body) and [`reqwest::Response`]; implement it
/// for the response type of another client.
pub trait Answer: Send + Sized {
    /// The answer's status, which decides whether a retry may help.
    fn status(&self) -> StatusCode;
    /// The answer's headers (`Retry-After`, `Idempotent-Replayed`).
    fn headers(&self) -> &HeaderMap;
    /// The body, read to the end; only used to report a final error, so a body that
    /// cannot be read reports as empty.
    fn into_body(self) -> impl Future<Output = Bytes> + Send;
}

impl<B> Answer for http::Response<B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    fn status(&self) -> StatusCode {
        http::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        http::Response::headers(self)
    }

    async fn into_body(self) -> Bytes {
        match http::Response::into_body(self).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        }
    }
}

impl Answer for reqwest::Response {
    fn status(&self) -> StatusCode {
        reqwest::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        reqwest::Response::headers(self)
    }

    async fn into_body(self) -> Bytes {
        self.bytes().await.unwrap_or_default()
    }
}

/// A failure to get an answer at all (connection refused, reset, timeout, …).
///
/// Only the transport can tell whether the request may have reached the server; with
/// an idempotency key, sending it again is safe either way, so a failure in transit is
/// retryable. What is not: a request that could not even be built, a body that failed.
pub trait TransportError: std::error::Error + Send + Sync + 'static {
    /// Whether sending the same request again may succeed.
    fn is_retryable(&self) -> bool;
}

impl TransportError for reqwest::Error {
    fn is_retryable(&self) -> bool {
        // `is_request` covers a connection closed or reset while the request was on the
        // wire; `is_body` a response body that broke off (reqwest reports it as a decode
        // error caused by a body error when the body is read whole). A request body
        // that fails is a stream, and streaming requests get one attempt anyway.
        // `is_builder`, other decode errors and `is_redirect` do not improve.
        let broken_body = self.is_body()
            || (self.is_decode()
                && std::error::Error::source(self)
                    .and_then(|s| s.downcast_ref::<reqwest::Error>())
                    .is_some_and(reqwest::Error::is_body));
        !self.is_builder()
            && (self.is_connect() || self.is_timeout() || self.is_request() || broken_body)
    }
}

impl TransportError for reqwest_middleware::Error {
    fn is_retryable(&self) -> bool {
        match self {
            reqwest_middleware::Error::Reqwest(e) => e.is_retryable(),
            // Another middleware's refusal: nothing says trying again would help.
            reqwest_middleware::Error::Middleware(_) => false,
        }
    }
}

impl TransportError for std::io::Error {
    fn is_retryable(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(
            self.kind(),
            ConnectionRefused
                | ConnectionReset
                | ConnectionAborted
                | NotConnected
                | BrokenPipe
                | TimedOut
                | Interrupted
                | UnexpectedEof
                | WouldBlock
        )
    }
}

/// A transport error of another client, with its retryability said by the caller
/// (the retry loop's error type for clients whose errors do not implement
/// [`TransportError`]).
///
/// ```
/// use idem_client::{Failure, TransportError};
/// let e = Failure::retryable(std::fmt::Error);
/// assert!(e.is_retryable());
/// assert!(!Failure::permanent(std::fmt::Error).is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure<E: std::error::Error + 'static> {
    #[source]
    error: E,
    retryable: bool,
}

impl<E: std::error::Error + 'static> Failure<E> {
    /// A failure in transit: the same request may be sent again.
    pub fn retryable(error: E) -> Self {
        Failure {
            error,
            retryable: true,
        }
    }

    /// A failure that sending again will not fix.
    pub fn permanent(error: E) -> Self {
        Failure {
            error,
            retryable: false,
        }
    }

    /// The transport's own error.
    pub fn get_ref(&self) -> &E {
        &self.error
    }

    /// Unwraps the error.
    pub fn into_inner(self) -> E {
        self.error
    }
}

impl<E: std::error::Error + Send + Sync + 'static> TransportError for Failure<E> {
    fn is_retryable(&self) -> bool {
        self.retryable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_in_transit_are_retryable() {
        use std::io::{Error, ErrorKind};
        assert!(Error::from(ErrorKind::ConnectionReset).is_retryable());
        assert!(Error::from(ErrorKind::ConnectionRefused).is_retryable());
        assert!(Error::from(ErrorKind::TimedOut).is_retryable());
        assert!(!Error::from(ErrorKind::InvalidInput).is_retryable());
        assert!(!Error::from(ErrorKind::PermissionDenied).is_retryable());
    }

    #[tokio::test]
    async fn a_request_that_cannot_be_built_is_not_retryable() {
        let e = reqwest::Client::new()
            .post("not a url")
            .send()
            .await
            .unwrap_err();
        assert!(e.is_builder());
        assert!(!e.is_retryable());
        assert!(!reqwest_middleware::Error::from(e).is_retryable());
    }

    #[tokio::test]
    async fn http_response_body_is_read() {
        let res = http::Response::builder()
            .status(503)
            .body(String::from("busy"))
            .unwrap();
        assert_eq!(Answer::status(&res), 503);
        assert_eq!(Answer::into_body(res).await, "busy");
    }
}
