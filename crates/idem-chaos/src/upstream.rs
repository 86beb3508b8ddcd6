//! The protected API: a hyper server on loopback that records every request it gets
//! (who, which key, which attempt, when) and, when told to, misbehaves: slow answers,
//! 500s (stored by idem), 503s (refusals that did nothing, not stored), and connections
//! closed after the work was done (the answer is lost; idem must treat the outcome as
//! unknown).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::history::{ExecKind, Execution, History, OpKey, upstream_body};

/// How often the upstream misbehaves, per request (probabilities in 0..=1).
#[derive(Clone, Debug)]
pub struct UpstreamFaults {
    /// Holds the answer for up to `slow_max` (longer than the lease: renewals must
    /// keep the claim).
    pub slow: f64,
    /// Longest slow answer.
    pub slow_max: Duration,
    /// Executes and answers 500 (stored and replayed under the `stripe` profile).
    pub fail: f64,
    /// Answers 503 without doing anything (released: the retry executes).
    pub refuse: f64,
    /// Executes, then closes the connection without answering.
    pub reset: f64,
}

impl UpstreamFaults {
    /// A well-behaved upstream (answers within a few milliseconds).
    pub fn none() -> Self {
        UpstreamFaults {
            slow: 0.0,
            slow_max: Duration::ZERO,
            fail: 0.0,
            refuse: 0.0,
            reset: 0.0,
        }
    }

    /// The mix of the `upstream` fault kind.
    pub fn mix(lease: Duration) -> Self {
        UpstreamFaults {
            slow: 0.10,
            slow_max: lease + lease / 4,
            fail: 0.05,
            refuse: 0.05,
            reset: 0.03,
        }
    }
}

/// Counts of what the upstream did.
#[derive(Debug, Default)]
pub struct UpstreamCounts {
    /// Slow answers.
    pub slow: AtomicU64,
    /// 500s.
    pub fail: AtomicU64,
    /// 503 refusals.
    pub refuse: AtomicU64,
    /// Connections closed after executing.
    pub reset: AtomicU64,
}

impl UpstreamCounts {
    /// All injected upstream faults.
    pub fn total(&self) -> u64 {
        self.slow.load(Ordering::Relaxed)
            + self.fail.load(Ordering::Relaxed)
            + self.refuse.load(Ordering::Relaxed)
            + self.reset.load(Ordering::Relaxed)
    }
}

struct Shared {
    history: History,
    faults: UpstreamFaults,
    enabled: AtomicBool,
    next_exec: AtomicU64,
    counts: UpstreamCounts,
}

/// A running upstream; stops accepting when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed after executing (injected)")
    }
}

impl std::error::Error for Reset {}

impl Upstream {
    /// Starts on 127.0.0.1:0.
    pub async fn start(history: History, faults: UpstreamFaults) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            history,
            faults,
            enabled: AtomicBool::new(true),
            next_exec: AtomicU64::new(1),
            counts: UpstreamCounts::default(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(s.clone(), req));
                    // A handler error (the injected reset) ends the connection without
                    // an answer, which is the point.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, shared, task })
    }

    /// Turns the injected faults on or off (off for the final verification).
    pub fn set_faults(&self, on: bool) {
        self.shared.enabled.store(on, Ordering::SeqCst);
    }

    /// What was injected so far.
    pub fn counts(&self) -> &UpstreamCounts {
        &self.shared.counts
    }
}

fn header(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

enum Plan {
    Answer(StatusCode, Duration),
    Refuse,
    Reset,
}

fn plan(s: &Shared) -> Plan {
    let f = &s.faults;
    if !s.enabled.load(Ordering::SeqCst) {
        return Plan::Answer(StatusCode::CREATED, Duration::ZERO);
    }
    let roll = fastrand::f64();
    let slow = if fastrand::f64() < f.slow {
        s.counts.slow.fetch_add(1, Ordering::Relaxed);
        f.slow_max.mul_f64(fastrand::f64())
    } else {
        Duration::ZERO
    };
    if roll < f.refuse {
        s.counts.refuse.fetch_add(1, Ordering::Relaxed);
        Plan::Refuse
    } else if roll < f.refuse + f.reset {
        s.counts.reset.fetch_add(1, Ordering::Relaxed);
        Plan::Reset
    } else if roll < f.refuse + f.reset + f.fail {
        s.counts.fail.fetch_add(1, Ordering::Relaxed);
        Plan::Answer(StatusCode::INTERNAL_SERVER_ERROR, slow)
    } else {
        Plan::Answer(StatusCode::CREATED, slow)
    }
}

async fn handle(s: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Reset> {
    let at = s.history.now();
    let op = OpKey {
        tenant: header(&req, "authorization"),
        route: req.uri().path().to_owned(),
        key: header(&req, "idempotency-key"),
    };
    let attempt_id = header(&req, "x-attempt-id");
    // The whole request arrives before anything is done, as with a real API.
    if req.into_body().collect().await.is_err() {
        return Err(Reset);
    }
    let exec = s.next_exec.fetch_add(1, Ordering::Relaxed);
    let (kind, response) = match plan(&s) {
        Plan::Refuse => {
            let body = Bytes::from(upstream_body(&op, exec, &attempt_id, 503));
            (
                ExecKind::Refused,
                Some((StatusCode::SERVICE_UNAVAILABLE, body, Duration::ZERO)),
            )
        }
        Plan::Reset => (ExecKind::Reset, None),
        Plan::Answer(status, delay) => {
            let body = Bytes::from(upstream_body(&op, exec, &attempt_id, status.as_u16()));
            (
                ExecKind::Answered {
                    status: status.as_u16(),
                    body: body.clone(),
                },
                Some((status, body, delay)),
            )
        }
    };
    s.history.execution(Execution {
        op,
        attempt_id,
        at,
        kind,
    });
    let Some((status, body, delay)) = response else {
        return Err(Reset);
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(res)
}
