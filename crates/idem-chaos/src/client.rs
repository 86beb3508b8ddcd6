//! A careful client: one key per operation, the same key and payload on every attempt,
//! backoff with jitter and `Retry-After` (idem-client's retry loop), each attempt to
//! the next `idem` instance, every attempt and answer recorded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use idem_client::{Attempt as ClientAttempt, Failure, IdempotencyKey, RetryPolicy};

use crate::history::{Attempt, AttemptResult, History, OpKey, TransportKind, hash};

/// What the clients share.
#[derive(Clone)]
pub struct Clients {
    /// The run's history.
    pub history: History,
    /// The `idem` instances' addresses (stable: a restarted instance keeps its port).
    pub instances: Arc<Vec<SocketAddr>>,
    /// HTTP client (keep-alive pool, like a real caller).
    pub http: reqwest::Client,
    /// The retry policy.
    pub policy: RetryPolicy,
    /// Hang-ups: this share of the attempts gives up after at most this long, as a
    /// caller that goes away mid-request (then retries with the same key).
    pub hang_up: Option<(f64, Duration)>,
    next_attempt: Arc<AtomicU64>,
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpEnd {
    /// A final answer (success, stored failure, or refusal).
    Answered,
    /// The client gave up within its bounds (the outcome may be unknown).
    GaveUp,
}

/// The attempt id prefix of verification requests.
pub const VERIFY_PREFIX: &str = "verify-";

impl Clients {
    /// Clients of `instances`, retrying within `budget`.
    pub fn new(history: History, instances: Vec<SocketAddr>, budget: Duration) -> Self {
        let policy = RetryPolicy::default()
            .with_max_attempts(40)
            .with_backoff(Duration::from_millis(50), Duration::from_millis(800))
            .with_max_elapsed(budget)
            .with_attempt_timeout(Some(Duration::from_secs(8)));
        Clients {
            history,
            instances: Arc::new(instances),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(8)
                .build()
                .expect("reqwest client"),
            policy,
            hang_up: None,
            next_attempt: Arc::default(),
        }
    }

    /// Runs one operation to its end. `first` is the instance of the first attempt;
    /// later attempts go round the others. `verification` marks the final check.
    pub async fn run(&self, op: &OpKey, payload: &serde_json::Value, first: usize) -> OpEnd {
        self.run_inner(op, payload, first, false).await
    }

    /// Sends an operation again after the run, to check that its record replays.
    pub async fn verify(&self, op: &OpKey, payload: &serde_json::Value, first: usize) -> OpEnd {
        self.run_inner(op, payload, first, true).await
    }

    async fn run_inner(
        &self,
        op: &OpKey,
        payload: &serde_json::Value,
        first: usize,
        verification: bool,
    ) -> OpEnd {
        let key = IdempotencyKey::new(op.key.clone()).expect("valid key");
        let fingerprint = hash(payload.to_string().as_bytes());
        let result = idem_client::retry_with_key(&self.policy, key, |attempt: ClientAttempt| {
            let instance = (first + attempt.number as usize - 1) % self.instances.len();
            // Every other attempt spells the payload differently (key order, spaces):
            // the canonical JSON fingerprint must see the same request.
            let body = if attempt.number.is_multiple_of(2) {
                serde_json::to_string_pretty(payload).expect("json")
            } else {
                payload.to_string()
            };
            self.attempt(
                op,
                &fingerprint,
                instance,
                body,
                attempt.timeout,
                verification,
            )
        })
        .await;
        match result {
            Ok(_)
            | Err(idem_client::Error::Failed { .. })
            | Err(idem_client::Error::Refused { .. })
            | Err(idem_client::Error::KeyReused { .. }) => OpEnd::Answered,
            Err(_) => OpEnd::GaveUp,
        }
    }

    async fn attempt(
        &self,
        op: &OpKey,
        fingerprint: &str,
        instance: usize,
        body: String,
        timeout: Duration,
        verification: bool,
    ) -> Result<http::Response<Full<Bytes>>, Failure<reqwest::Error>> {
        let n = self.next_attempt.fetch_add(1, Ordering::Relaxed);
        let attempt_id = if verification {
            format!("{VERIFY_PREFIX}{n}")
        } else {
            format!("a{n}")
        };
        let timeout = if verification {
            timeout
        } else {
            self.hang_up_timeout(timeout)
        };
        let sent = self.history.now();
        let answer = self.send(op, instance, &attempt_id, body, timeout).await;
        let record = |result| {
            self.history.attempt(Attempt {
                op: op.clone(),
                attempt_id: attempt_id.clone(),
                instance,
                fingerprint: fingerprint.to_owned(),
                sent,
                done: self.history.now(),
                result,
                verification,
            })
        };
        match answer {
            Ok((status, headers, body)) => {
                let replayed = headers
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true");
                record(AttemptResult::Answer {
                    status: status.as_u16(),
                    replayed,
                    body: body.clone(),
                });
                Ok(into_response(status, headers, body))
            }
            Err(e) => {
                record(AttemptResult::Transport(transport_kind(&e)));
                // With a key, any failure in transit is worth another attempt,
                // including a body that broke off after the headers.
                if e.is_builder() {
                    Err(Failure::permanent(e))
                } else {
                    Err(Failure::retryable(e))
                }
            }
        }
    }

    /// The attempt's timeout: shortened at random for the share of attempts whose
    /// caller hangs up mid-request.
    fn hang_up_timeout(&self, timeout: Duration) -> Duration {
        match self.hang_up {
            Some((share, within)) if fastrand::f64() < share => within
                .mul_f64(fastrand::f64())
                .max(Duration::from_millis(20)),
            _ => timeout,
        }
    }

    /// Sends one attempt to `instance` and reads the whole answer.
    async fn send(
        &self,
        op: &OpKey,
        instance: usize,
        attempt_id: &str,
        body: String,
        timeout: Duration,
    ) -> Result<(http::StatusCode, http::HeaderMap, Bytes), reqwest::Error> {
        let url = format!("http://{}{}", self.instances[instance], op.route);
        let res = self
            .http
            .post(url)
            .timeout(timeout)
            .header("authorization", &op.tenant)
            .header("idempotency-key", &op.key)
            .header("x-attempt-id", attempt_id)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.bytes().await?;
        Ok((status, headers, body))
    }
}

/// The answer as the client library's response type.
fn into_response(
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
) -> http::Response<Full<Bytes>> {
    let mut res = http::Response::new(Full::new(body));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}

/// What kind of transport failure an attempt met.
fn transport_kind(e: &reqwest::Error) -> TransportKind {
    if e.is_connect() {
        TransportKind::Connect
    } else if e.is_timeout() {
        TransportKind::Timeout
    } else {
        TransportKind::Broken
    }
}
