//! The retry loop, shared by the reqwest middleware and the plain [`retry`] helper: one
//! operation, one key, attempts until a final answer or the policy's bounds.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::{Duration, Instant, SystemTime};

use crate::answer::{Answer, TransportError};
use crate::classify::{Verdict, classify, is_key_reused};
use crate::error::{Error, LastAttempt, Stopped};
use crate::key::IdempotencyKey;
use crate::policy::RetryPolicy;

/// One attempt of an operation, handed to the closure of [`retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Attempt {
    /// The operation's key: send it (in the policy's header) on this attempt.
    pub key: IdempotencyKey,
    /// 1 for the first attempt.
    pub number: u32,
    /// The most this attempt may take (the policy's `attempt_timeout` within what is
    /// left of `max_elapsed`). The loop enforces it; give it to the client too, so that
    /// it stops waiting at the same time.
    pub timeout: Duration,
}

/// How an attempt failed to produce an answer.
pub(crate) enum AttemptError<E> {
    Transport(E),
    TimedOut(Duration),
}

/// Runs one operation with retries, under a fresh key (UUID v4).
///
/// `send` makes one attempt: it sends the request with `attempt.key` in the policy's
/// header (`Idempotency-Key`) and returns the answer, or the transport's error. It is
/// called again, with the same key, for as long as the answers say a retry may succeed
/// (see the crate docs) and the policy allows. Needs a Tokio runtime (for the timers).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use idem_client::{Attempt, RetryPolicy, Error};
///
/// let policy = RetryPolicy::default().with_backoff(Duration::from_millis(1), Duration::from_millis(5));
/// // A transport that fails twice, then answers.
/// let answer = idem_client::retry(&policy, |attempt: Attempt| async move {
///     let status = if attempt.number < 3 { 503 } else { 201 };
///     Ok::<_, std::io::Error>(http::Response::builder().status(status).body(String::new()).unwrap())
/// })
/// .await
/// .unwrap();
/// assert_eq!(answer.status(), 201);
///
/// // A refusal is never retried and says what happened.
/// let err = idem_client::retry(&policy, |_attempt| async {
///     Ok::<_, std::io::Error>(http::Response::builder().status(400).body("bad amount".to_owned()).unwrap())
/// })
/// .await
/// .unwrap_err();
/// assert!(matches!(&err, Error::Refused { status, body, .. } if *status == 400 && body == "bad amount"));
/// assert!(!err.is_retryable());
/// # }
/// ```
///
/// # Panics
/// If the policy is invalid; call [`RetryPolicy::validate`] first to handle the error.
pub async fn retry<F, Fut, R, E>(policy: &RetryPolicy, send: F) -> Result<R, Error<E>>
where
    F: FnMut(Attempt) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    R: Answer,
    E: TransportError,
{
    retry_with_key(policy, IdempotencyKey::generate(), send).await
}

/// Like [`retry`], under the caller's key (e.g. stored with the operation, so that a
/// retry after a crash of the caller uses it again).
///
/// # Panics
/// If the policy is invalid; call [`RetryPolicy::validate`] first to handle the error.
pub async fn retry_with_key<F, Fut, R, E>(
    policy: &RetryPolicy,
    key: IdempotencyKey,
    mut send: F,
) -> Result<R, Error<E>>
where
    F: FnMut(Attempt) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    R: Answer,
    E: TransportError,
{
    let mut run = Run::new(policy, key, Resend::Possible);
    loop {
        let attempt = run.begin();
        let timeout = attempt.timeout;
        let result = match tokio::time::timeout(timeout, send(attempt)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(AttemptError::Transport(e)),
            Err(_) => Err(AttemptError::TimedOut(timeout)),
        };
        if let ControlFlow::Break(outcome) = run.settle(result).await {
            return outcome;
        }
    }
}

/// An attempt's result, sorted by [`Run::judge`].
enum Judged<R, E: std::error::Error + 'static> {
    /// An answer the retries end with.
    Final(R),
    /// A transport error no retry would mend.
    NotRetryable(Error<E>),
    /// A failure worth a retry, if the policy allows one.
    Retry(Failed<R, E>),
}

/// An attempt that a retry may mend.
struct Failed<R, E: std::error::Error + 'static> {
    /// What the attempt gave: the transport's error or timeout, or the answer (kept
    /// for the error if no retry follows).
    pending: Result<LastAttempt<E>, R>,
    /// Why a retry may mend it, for the logs.
    reason: &'static str,
    /// The server's `Retry-After`.
    retry_after: Option<Duration>,
}

/// Whether a request's body can be sent again (a streaming one cannot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// The request can be cloned: every attempt sends a copy.
    Possible,
    /// The body streams: the one attempt sends it.
    Impossible,
}

/// The state of one operation.
pub(crate) struct Run<'p> {
    policy: &'p RetryPolicy,
    key: IdempotencyKey,
    started: Instant,
    attempts: u32,
    /// Whether the request's body can be sent again: if not, one attempt only.
    resend: Resend,
}

impl<'p> Run<'p> {
    pub(crate) fn new(policy: &'p RetryPolicy, key: IdempotencyKey, resend: Resend) -> Self {
        if let Err(e) = policy.clone().validate() {
            panic!("invalid retry policy: {e}");
        }
        Run {
            policy,
            key,
            started: Instant::now(),
            attempts: 0,
            resend,
        }
    }

    pub(crate) fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    fn remaining(&self) -> Duration {
        self.policy
            .max_elapsed
            .saturating_sub(self.started.elapsed())
    }

    /// Starts the next attempt.
    pub(crate) fn begin(&mut self) -> Attempt {
        self.attempts += 1;
        let remaining = self.remaining();
        let timeout = self
            .policy
            .attempt_timeout
            .map_or(remaining, |t| t.min(remaining));
        tracing::debug!(
            key = %self.key,
            attempt = self.attempts,
            timeout_ms = timeout.as_millis() as u64,
            "idempotent request: sending"
        );
        Attempt {
            key: self.key.clone(),
            number: self.attempts,
            timeout,
        }
    }

    /// Judges an attempt's result: `Break` with the operation's result, or `Continue`
    /// after waiting for the next attempt.
    pub(crate) async fn settle<R, E>(
        &mut self,
        result: Result<R, AttemptError<E>>,
    ) -> ControlFlow<Result<R, Error<E>>>
    where
        R: Answer,
        E: TransportError,
    {
        let failed = match self.judge(result) {
            Judged::Final(answer) => return ControlFlow::Break(self.finish(answer).await),
            Judged::NotRetryable(e) => return ControlFlow::Break(Err(e)),
            Judged::Retry(failed) => failed,
        };
        let Failed {
            pending,
            reason,
            retry_after,
        } = failed;
        if self.resend == Resend::Impossible {
            tracing::warn!(key = %self.key, reason, "idempotent request: streaming body, cannot retry");
            let last = last_attempt(pending).await;
            return ControlFlow::Break(Err(Error::NotRepeatable {
                key: self.key.clone(),
                last,
            }));
        }
        let delay = match self.next_delay(retry_after) {
            Ok(delay) => delay,
            Err(stopped) => {
                tracing::warn!(key = %self.key, attempts = self.attempts, reason, %stopped, "idempotent request: giving up");
                let last = last_attempt(pending).await;
                return ControlFlow::Break(Err(Error::GaveUp {
                    key: self.key.clone(),
                    attempts: self.attempts,
                    stopped,
                    last,
                }));
            }
        };
        self.log_retry(&pending, reason, delay);
        // Let go of the answer (and its connection) before waiting.
        drop(pending);
        tokio::time::sleep(delay).await;
        ControlFlow::Continue(())
    }

    /// Sorts an attempt's result: a final answer, a transport error not worth a
    /// retry, or a failure a retry may mend.
    fn judge<R, E>(&self, result: Result<R, AttemptError<E>>) -> Judged<R, E>
    where
        R: Answer,
        E: TransportError,
    {
        let (pending, reason, retry_after) = match result {
            Ok(answer) => match classify(answer.status(), answer.headers(), SystemTime::now()) {
                Verdict::Final => return Judged::Final(answer),
                Verdict::Retry {
                    reason,
                    retry_after,
                } => (Err(answer), reason, retry_after),
            },
            Err(AttemptError::Transport(e)) if !e.is_retryable() => {
                tracing::debug!(key = %self.key, attempt = self.attempts, error = %e, "idempotent request: not retryable");
                return Judged::NotRetryable(Error::Transport {
                    key: self.key.clone(),
                    source: e,
                });
            }
            Err(AttemptError::Transport(e)) => {
                (Ok(LastAttempt::Transport(e)), "transport error", None)
            }
            Err(AttemptError::TimedOut(after)) => {
                (Ok(LastAttempt::TimedOut(after)), "attempt timed out", None)
            }
        };
        Judged::Retry(Failed {
            pending,
            reason,
            retry_after,
        })
    }

    /// The wait before the next attempt, or why there is none.
    fn next_delay(&self, retry_after: Option<Duration>) -> Result<Duration, Stopped> {
        let stopped = if self.attempts >= self.policy.max_attempts {
            Some(Stopped::MaxAttempts)
        } else {
            None
        };
        // Never earlier than the server asked; jittered so that callers that failed
        // together spread out.
        let backoff = self.policy.backoff(self.attempts);
        let remaining = self.remaining();
        let delay = match retry_after {
            // The jitter on top of the server's wait is a courtesy, dropped when only
            // the server's wait fits in the budget.
            Some(ra) if ra.max(backoff) >= remaining && ra < remaining => ra,
            Some(ra) => ra.max(backoff),
            None => backoff,
        };
        let stopped = stopped.or_else(|| {
            (delay >= remaining).then(|| match retry_after {
                Some(ra) if ra >= remaining => Stopped::RetryAfterBeyondBudget(ra),
                _ => Stopped::MaxElapsed,
            })
        });
        stopped.map_or(Ok(delay), Err)
    }

    fn log_retry<R: Answer, E: TransportError>(
        &self,
        pending: &Result<LastAttempt<E>, R>,
        reason: &str,
        delay: Duration,
    ) {
        match pending {
            Ok(LastAttempt::Transport(e)) => tracing::info!(
                key = %self.key, attempt = self.attempts, reason, error = %e,
                delay_ms = delay.as_millis() as u64, "idempotent request: retrying"
            ),
            Ok(_) => tracing::info!(
                key = %self.key, attempt = self.attempts, reason,
                delay_ms = delay.as_millis() as u64, "idempotent request: retrying"
            ),
            Err(answer) => tracing::info!(
                key = %self.key, attempt = self.attempts, reason, status = answer.status().as_u16(),
                delay_ms = delay.as_millis() as u64, "idempotent request: retrying"
            ),
        }
    }

    /// Maps a final answer to the operation's result.
    async fn finish<R: Answer, E: TransportError>(&self, answer: R) -> Result<R, Error<E>> {
        let status = answer.status();
        if !(status.is_client_error() || status.is_server_error()) {
            tracing::debug!(key = %self.key, attempt = self.attempts, status = status.as_u16(), "idempotent request: done");
            return Ok(answer);
        }
        let key = self.key.clone();
        let headers = answer.headers().clone();
        let body = answer.into_body().await;
        tracing::debug!(key = %key, attempt = self.attempts, status = status.as_u16(), "idempotent request: final error");
        Err(if is_key_reused(&body) {
            Error::KeyReused { key, status, body }
        } else if status.is_client_error() {
            Error::Refused {
                key,
                status,
                headers,
                body,
            }
        } else {
            Error::Failed {
                key,
                status,
                headers,
                body,
            }
        })
    }
}

async fn last_attempt<R: Answer, E: std::error::Error>(
    pending: Result<LastAttempt<E>, R>,
) -> LastAttempt<E> {
    match pending {
        Ok(last) => last,
        Err(answer) => LastAttempt::Status {
            status: answer.status(),
            headers: answer.headers().clone(),
            body: answer.into_body().await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn fast() -> RetryPolicy {
        RetryPolicy::default().with_backoff(Duration::from_millis(1), Duration::from_millis(2))
    }

    fn answer(status: u16, headers: &[(&'static str, &'static str)]) -> http::Response<String> {
        let mut b = http::Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(format!("status {status}")).unwrap()
    }

    /// Runs `retry` against a scripted sequence of statuses; returns the result and
    /// the attempts seen.
    async fn script(
        policy: &RetryPolicy,
        statuses: &[(u16, &'static [(&'static str, &'static str)])],
    ) -> (
        Result<http::Response<String>, Error<std::io::Error>>,
        Vec<Attempt>,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let result = retry(policy, |a: Attempt| {
            let (s, h) = statuses[(a.number as usize - 1).min(statuses.len() - 1)];
            seen.lock().unwrap().push(a);
            async move { Ok(answer(s, h)) }
        })
        .await;
        let seen = seen.lock().unwrap().clone();
        (result, seen)
    }

    #[tokio::test]
    async fn same_key_on_every_attempt_until_success() {
        let (res, seen) = script(&fast(), &[(503, &[]), (500, &[]), (201, &[])]).await;
        assert_eq!(res.unwrap().status(), 201);
        assert_eq!(seen.len(), 3);
        assert_eq!(seen.iter().map(|a| a.number).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(seen.iter().all(|a| a.key == seen[0].key));
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts_with_the_last_status() {
        let (res, seen) = script(&fast().with_max_attempts(3), &[(502, &[])]).await;
        assert_eq!(seen.len(), 3);
        match res.unwrap_err() {
            Error::GaveUp {
                attempts,
                stopped,
                last,
                ..
            } => {
                assert_eq!(attempts, 3);
                assert_eq!(stopped, Stopped::MaxAttempts);
                assert_eq!(last.status(), Some(http::StatusCode::BAD_GATEWAY));
                assert!(matches!(last, LastAttempt::Status { body, .. } if body == "status 502"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_replayed_500_is_final() {
        let (res, seen) = script(&fast(), &[(500, &[("idempotent-replayed", "true")])]).await;
        assert_eq!(seen.len(), 1);
        let err = res.unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn retry_after_beyond_the_budget_gives_up_at_once() {
        let policy = fast().with_max_elapsed(Duration::from_secs(5));
        let (res, seen) = script(&policy, &[(503, &[("retry-after", "3600")])]).await;
        assert_eq!(seen.len(), 1);
        match res.unwrap_err() {
            Error::GaveUp { stopped, .. } => assert_eq!(
                stopped,
                Stopped::RetryAfterBeyondBudget(Duration::from_secs(3600))
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn key_reused_is_its_own_error() {
        let (res, seen) = script(
            &fast(),
            &[(422, &[("content-type", "application/problem+json")])],
        )
        .await;
        assert_eq!(seen.len(), 1);
        // The body is not idem's problem: a plain validation refusal.
        assert!(matches!(res.unwrap_err(), Error::Refused { status, .. } if status == 422));

        let policy = fast();
        let err = retry(&policy, |_| async {
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(422)
                    .body(r#"{"type":"urn:idem:problem:idempotency-key-reused"}"#.to_owned())
                    .unwrap(),
            )
        })
        .await
        .unwrap_err();
        assert!(matches!(err, Error::KeyReused { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn transport_errors_retry_when_retryable_only() {
        let policy = fast().with_max_attempts(2);
        let calls = Mutex::new(0);
        let err = retry(&policy, |_| {
            *calls.lock().unwrap() += 1;
            async {
                Err::<http::Response<String>, _>(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))
            }
        })
        .await
        .unwrap_err();
        assert_eq!(*calls.lock().unwrap(), 2);
        assert!(matches!(
            err,
            Error::GaveUp {
                last: LastAttempt::Transport(_),
                ..
            }
        ));

        *calls.lock().unwrap() = 0;
        let err = retry(&policy, |_| {
            *calls.lock().unwrap() += 1;
            async {
                Err::<http::Response<String>, _>(std::io::Error::from(
                    std::io::ErrorKind::InvalidInput,
                ))
            }
        })
        .await
        .unwrap_err();
        assert_eq!(*calls.lock().unwrap(), 1);
        assert!(matches!(err, Error::Transport { .. }));
    }

    #[tokio::test]
    async fn a_slow_attempt_times_out_and_is_retried() {
        let policy = fast()
            .with_max_attempts(2)
            .with_attempt_timeout(Some(Duration::from_millis(20)));
        let seen = Mutex::new(Vec::new());
        let res = retry(&policy, |a: Attempt| {
            seen.lock().unwrap().push(a.timeout);
            let first = a.number == 1;
            async move {
                if first {
                    // Longer than the attempt timeout: never answers in time.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok::<_, std::io::Error>(answer(201, &[]))
            }
        })
        .await;
        assert_eq!(res.unwrap().status(), 201);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|t| *t <= Duration::from_millis(20)));
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn every_attempt_is_logged_with_the_key_and_its_number() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let key = IdempotencyKey::new("log-key-1").unwrap();
        let res = retry_with_key(&fast(), key, |a: Attempt| async move {
            Ok::<_, std::io::Error>(answer(if a.number < 3 { 503 } else { 201 }, &[]))
        })
        .await;
        assert_eq!(res.unwrap().status(), 201);
        let logs = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        for n in 1..=3 {
            assert!(
                logs.lines().any(|l| l.contains("sending")
                    && l.contains("key=log-key-1")
                    && l.contains(&format!("attempt={n}"))),
                "attempt {n} not logged:\n{logs}"
            );
        }
        assert_eq!(
            logs.lines()
                .filter(|l| l.contains("retrying") && l.contains("status=503"))
                .count(),
            2,
            "{logs}"
        );
    }

    #[test]
    #[should_panic(expected = "invalid retry policy")]
    fn an_invalid_policy_panics() {
        let policy = RetryPolicy::default().with_max_attempts(0);
        let _ = Run::new(&policy, IdempotencyKey::generate(), Resend::Possible);
    }
}
