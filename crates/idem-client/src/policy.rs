//! The retry policy: how many attempts, how long, how far apart, on which methods.

use std::time::Duration;

use http::{HeaderName, Method};

use crate::key::IDEMPOTENCY_KEY;

/// How an operation is retried.
///
/// Consuming builder with safe defaults: 5 attempts, exponential backoff with full jitter
/// from 100 ms capped at 5 s, 10 s per attempt, 30 s in all, `POST` and `PATCH` only.
///
/// ```
/// use std::time::Duration;
/// use idem_client::RetryPolicy;
/// let policy = RetryPolicy::default()
///     .with_max_attempts(3)
///     .with_backoff(Duration::from_millis(50), Duration::from_secs(1))
///     .validate()
///     .unwrap();
/// assert_eq!(policy.max_attempts, 3);
/// assert!(RetryPolicy::default().with_max_attempts(0).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Default 5; at least 1.
    pub max_attempts: u32,
    /// Backoff before the first retry, doubled for each next one (before jitter).
    /// Default 100 ms.
    pub base: Duration,
    /// Longest backoff (before jitter). Default 5 s. A server's `Retry-After` may ask for
    /// longer and is honoured, within `max_elapsed`.
    pub cap: Duration,
    /// Time budget of the whole operation, from the first attempt: no attempt runs and
    /// no wait lasts past it. Default 30 s.
    pub max_elapsed: Duration,
    /// Longest time one attempt may take, within what is left of `max_elapsed`; `None`
    /// leaves each attempt the whole remaining budget. Default 10 s. With the reqwest
    /// middleware it bounds the whole exchange, reading the response body included.
    pub attempt_timeout: Option<Duration>,
    /// Methods whose requests get a key and retries; the others pass through untouched.
    /// Default `POST`, `PATCH` (what an idem server protects by default).
    pub methods: Vec<Method>,
    /// Header that carries the key. Default `Idempotency-Key`.
    pub header: HeaderName,
    /// With the reqwest middleware: a response whose `Content-Length` is at most this
    /// many bytes is read to the end within its attempt, and a body that breaks off is
    /// retried with the same key (an idem server breaks a response off when it could
    /// not store its outcome, so that no client holds an answer that would not
    /// replay). Larger or unsized responses are returned streaming, and a body that
    /// breaks off is the caller's to retry. Default 8 MiB; 0 never reads ahead.
    pub read_body_up_to: u64,
}

/// A refused [`RetryPolicy`] setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// `max_attempts` is 0.
    #[error("max_attempts must be at least 1")]
    NoAttempts,
    /// `base` is zero.
    #[error("the backoff base must be more than zero")]
    ZeroBase,
    /// `cap` is below `base`.
    #[error("the backoff cap ({cap:?}) must be at least the base ({base:?})")]
    CapBelowBase {
        /// The configured base (first backoff).
        base: Duration,
        /// The configured cap (longest backoff).
        cap: Duration,
    },
    /// `max_elapsed` is zero.
    #[error("max_elapsed must be more than zero")]
    ZeroBudget,
    /// `attempt_timeout` is zero.
    #[error("attempt_timeout must be more than zero")]
    ZeroAttemptTimeout,
    /// `methods` is empty: the middleware would do nothing.
    #[error("at least one method must be retried")]
    NoMethods,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
            attempt_timeout: Some(Duration::from_secs(10)),
            methods: vec![Method::POST, Method::PATCH],
            header: HeaderName::from_static(IDEMPOTENCY_KEY),
            read_body_up_to: 8 * 1024 * 1024,
        }
    }
}

impl RetryPolicy {
    /// The defaults (see the type's docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the number of attempts, the first included.
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets the backoff: `base` before the first retry, doubling, never above `cap`
    /// (each wait is then drawn uniformly between zero and that: "full jitter").
    pub fn with_backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.base = base;
        self.cap = cap;
        self
    }

    /// Sets the time budget of the whole operation.
    pub fn with_max_elapsed(mut self, budget: Duration) -> Self {
        self.max_elapsed = budget;
        self
    }

    /// Sets the longest time one attempt may take (`None`: the remaining budget).
    pub fn with_attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sets the methods that get a key and retries (e.g. add `PUT`).
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Sets the header that carries the key (e.g. `X-Idempotency-Key`).
    pub fn with_header(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }

    /// Sets the largest response body read to the end within its attempt (0: none).
    pub fn with_read_body_up_to(mut self, bytes: u64) -> Self {
        self.read_body_up_to = bytes;
        self
    }

    /// Checks every setting.
    pub fn validate(self) -> Result<Self, PolicyError> {
        if self.max_attempts == 0 {
            return Err(PolicyError::NoAttempts);
        }
        if self.base.is_zero() {
            return Err(PolicyError::ZeroBase);
        }
        if self.cap < self.base {
            return Err(PolicyError::CapBelowBase {
                base: self.base,
                cap: self.cap,
            });
        }
        if self.max_elapsed.is_zero() {
            return Err(PolicyError::ZeroBudget);
        }
        if self.attempt_timeout.is_some_and(|t| t.is_zero()) {
            return Err(PolicyError::ZeroAttemptTimeout);
        }
        if self.methods.is_empty() {
            return Err(PolicyError::NoMethods);
        }
        Ok(self)
    }

    /// Whether requests with `method` get a key and retries.
    pub fn applies_to(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// The most the wait before retry number `retry` (1 for the first retry) may be:
    /// `min(cap, base * 2^(retry-1))`.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before retry number `retry`: uniform between zero and
    /// [`backoff_ceiling`](Self::backoff_ceiling) ("full jitter"), so that clients
    /// that failed together do not come back together.
    pub fn backoff(&self, retry: u32) -> Duration {
        self.backoff_ceiling(retry).mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe_and_valid() {
        let p = RetryPolicy::default().validate().unwrap();
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.base, Duration::from_millis(100));
        assert_eq!(p.cap, Duration::from_secs(5));
        assert_eq!(p.max_elapsed, Duration::from_secs(30));
        assert_eq!(p.attempt_timeout, Some(Duration::from_secs(10)));
        assert_eq!(p.methods, [Method::POST, Method::PATCH]);
        assert_eq!(p.header, "idempotency-key");
        assert!(p.applies_to(&Method::POST) && p.applies_to(&Method::PATCH));
        for m in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            assert!(!p.applies_to(&m), "{m}");
        }
        assert_eq!(RetryPolicy::new(), p);
    }

    #[test]
    fn every_refused_value() {
        let p = RetryPolicy::default;
        assert_eq!(
            p().with_max_attempts(0).validate(),
            Err(PolicyError::NoAttempts)
        );
        assert_eq!(
            p().with_backoff(Duration::ZERO, Duration::from_secs(1))
                .validate(),
            Err(PolicyError::ZeroBase)
        );
        assert!(matches!(
            p().with_backoff(Duration::from_secs(2), Duration::from_secs(1))
                .validate(),
            Err(PolicyError::CapBelowBase { .. })
        ));
        assert_eq!(
            p().with_max_elapsed(Duration::ZERO).validate(),
            Err(PolicyError::ZeroBudget)
        );
        assert_eq!(
            p().with_attempt_timeout(Some(Duration::ZERO)).validate(),
            Err(PolicyError::ZeroAttemptTimeout)
        );
        assert_eq!(p().with_methods([]).validate(), Err(PolicyError::NoMethods));
        assert!(p().with_attempt_timeout(None).validate().is_ok());
        assert!(p().with_max_attempts(1).validate().is_ok());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::default()
            .with_backoff(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings: Vec<_> = (1..=6).map(|r| p.backoff_ceiling(r).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff_ceiling(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn full_jitter_stays_within_the_ceiling_and_varies() {
        let p = RetryPolicy::default();
        let waits: Vec<_> = (0..200).map(|_| p.backoff(3)).collect();
        assert!(waits.iter().all(|w| *w <= p.backoff_ceiling(3)));
        // 200 draws from a continuous uniform law are not all equal.
        assert!(waits.iter().any(|w| *w != waits[0]));
    }
}
