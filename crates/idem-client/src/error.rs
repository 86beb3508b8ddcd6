//! What the caller is told when an operation did not end with a successful answer.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::key::IdempotencyKey;

/// An operation that did not end with a successful (1xx–3xx) answer.
///
/// Every variant carries the operation's key: to try the same operation again later,
/// send it with that key, never a new one.
///
/// `E` is the transport's error type ([`reqwest_middleware::Error`] for the middleware).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error<E: std::error::Error + 'static = reqwest_middleware::Error> {
    /// No final answer within the policy's bounds: every attempt failed in transit or
    /// got a retryable answer (5xx, 409 in use, `Retry-After`). The outcome may be
    /// unknown: retry later with the same key.
    #[error(
        "gave up on idempotency key {key} after {attempts} attempt(s) ({stopped}); last: {last}"
    )]
    GaveUp {
        /// The operation's key.
        key: IdempotencyKey,
        /// Attempts made.
        attempts: u32,
        /// Why the retrying stopped.
        stopped: Stopped,
        /// The last attempt's answer or error.
        #[source]
        last: LastAttempt<E>,
    },
    /// The key was already used with another request (idem's `idempotency-key-reused`,
    /// 422 by default): two different operations share a key. A bug in the caller.
    #[error(
        "idempotency key {key} was already used with a different request (HTTP {status}): \
         each operation needs its own key"
    )]
    KeyReused {
        /// The operation's key.
        key: IdempotencyKey,
        /// The status (422 by default, 400 on Stripe-style servers).
        status: StatusCode,
        /// The problem document.
        body: Bytes,
    },
    /// The server refused the request (a 4xx that is not worth retrying, e.g. 400 or a
    /// validation 422). Fix the request; nothing was retried.
    #[error("the request with idempotency key {key} was refused with HTTP {status}")]
    Refused {
        /// The operation's key.
        key: IdempotencyKey,
        /// The final answer's status.
        status: StatusCode,
        /// The final answer's headers.
        headers: HeaderMap,
        /// The final answer's body, read to the end.
        body: Bytes,
    },
    /// The server executed the request and it failed, and this is its stored answer (a
    /// replay of a 5xx): sending the same key again replays the same failure.
    #[error(
        "the request with idempotency key {key} failed on the server with HTTP {status}; \
         this is its stored outcome, replayed"
    )]
    Failed {
        /// The operation's key.
        key: IdempotencyKey,
        /// The final answer's status.
        status: StatusCode,
        /// The final answer's headers.
        headers: HeaderMap,
        /// The final answer's body, read to the end.
        body: Bytes,
    },
    /// The request could not be sent and sending it again will not help (e.g. it could
    /// not be built). Not retried.
    #[error("the request with idempotency key {key} could not be sent")]
    Transport {
        /// The operation's key.
        key: IdempotencyKey,
        /// The transport's error.
        #[source]
        source: E,
    },
    /// The request body is a stream, which cannot be sent twice: it was sent once, and
    /// that attempt needed a retry. Buffer the body to get retries.
    #[error(
        "the request with idempotency key {key} has a streaming body, which cannot be sent \
         again; its only attempt ended with: {last}"
    )]
    NotRepeatable {
        /// The operation's key.
        key: IdempotencyKey,
        /// The attempt's answer or error.
        #[source]
        last: LastAttempt<E>,
    },
}

/// The last attempt of an operation that gave up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LastAttempt<E: std::error::Error + 'static> {
    /// An answer that asked for a retry.
    #[error("HTTP {status}")]
    Status {
        /// The last answer's status.
        status: StatusCode,
        /// The last answer's headers.
        headers: HeaderMap,
        /// The last answer's body, read to the end.
        body: Bytes,
    },
    /// A transport error.
    #[error("{0}")]
    Transport(#[source] E),
    /// No answer within the attempt's time.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// Why an operation stopped retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// `max_attempts` were made.
    MaxAttempts,
    /// The next wait would end past `max_elapsed`.
    MaxElapsed,
    /// The server's `Retry-After` asks to wait past `max_elapsed`.
    RetryAfterBeyondBudget(Duration),
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stopped::MaxAttempts => f.write_str("attempt limit reached"),
            Stopped::MaxElapsed => f.write_str("time budget spent"),
            Stopped::RetryAfterBeyondBudget(d) => {
                write!(f, "the server asked to wait {d:?}, past the time budget")
            }
        }
    }
}

impl<E: std::error::Error + 'static> LastAttempt<E> {
    /// The status, when the attempt got an answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            LastAttempt::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl<E: std::error::Error + 'static> Error<E> {
    /// The operation's key: send it again with this key, never a new one.
    pub fn key(&self) -> &IdempotencyKey {
        match self {
            Error::GaveUp { key, .. }
            | Error::KeyReused { key, .. }
            | Error::Refused { key, .. }
            | Error::Failed { key, .. }
            | Error::Transport { key, .. }
            | Error::NotRepeatable { key, .. } => key,
        }
    }

    /// The status of the last answer, if there was one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::GaveUp { last, .. } | Error::NotRepeatable { last, .. } => last.status(),
            Error::KeyReused { status, .. }
            | Error::Refused { status, .. }
            | Error::Failed { status, .. } => Some(*status),
            Error::Transport { .. } => None,
        }
    }

    /// Whether trying the same operation again later, with the same key, may succeed:
    /// true when the outcome is unknown or the server was unavailable (gave up, or a
    /// streaming body that could not be resent); false when the server gave its final
    /// word (refused, failed and stored, key reused) or the request cannot be sent.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::GaveUp { .. } | Error::NotRepeatable { .. } => true,
            Error::Refused { status, .. } => matches!(status.as_u16(), 408 | 425 | 429),
            Error::KeyReused { .. } | Error::Failed { .. } | Error::Transport { .. } => false,
        }
    }
}

impl Error<reqwest_middleware::Error> {
    /// The idem-client error inside an error of a [`reqwest_middleware`] client, if
    /// that is where it came from.
    pub fn from_middleware(error: &reqwest_middleware::Error) -> Option<&Self> {
        match error {
            reqwest_middleware::Error::Middleware(e) => e.downcast_ref(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> IdempotencyKey {
        IdempotencyKey::new("k-1").unwrap()
    }

    #[test]
    fn retryability_is_data() {
        let gave_up: Error<std::io::Error> = Error::GaveUp {
            key: key(),
            attempts: 5,
            stopped: Stopped::MaxAttempts,
            last: LastAttempt::Status {
                status: StatusCode::SERVICE_UNAVAILABLE,
                headers: HeaderMap::new(),
                body: Bytes::new(),
            },
        };
        assert!(gave_up.is_retryable());
        assert_eq!(gave_up.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(gave_up.key().as_str(), "k-1");
        let msg = gave_up.to_string();
        assert!(msg.contains("5 attempt") && msg.contains("k-1") && msg.contains("503"));

        let reused: Error<std::io::Error> = Error::KeyReused {
            key: key(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: Bytes::new(),
        };
        assert!(!reused.is_retryable());
        let refused = |s: u16| Error::<std::io::Error>::Refused {
            key: key(),
            status: StatusCode::from_u16(s).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        assert!(!refused(400).is_retryable());
        assert!(refused(429).is_retryable());
    }

    #[test]
    fn sources_are_kept() {
        use std::error::Error as _;
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e: Error<std::io::Error> = Error::GaveUp {
            key: key(),
            attempts: 2,
            stopped: Stopped::MaxElapsed,
            last: LastAttempt::Transport(io),
        };
        let last = e.source().expect("the last attempt");
        let io = last.source().expect("the transport error");
        assert!(io.downcast_ref::<std::io::Error>().is_some());
    }
}
