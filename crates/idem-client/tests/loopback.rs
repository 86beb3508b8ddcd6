//! The client against a real idem server on loopback: an axum app behind
//! `IdempotencyLayer` (memory store), served by hyper behind a front that injects
//! faults and records, server-side, every attempt (key, arrival, status) and every
//! execution of a handler. No mocks; no timing threshold in any assertion: waits are
//! checked as causal order ("not before the server allowed"), never as "within N ms".

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idem_client::{
    Error, IdempotencyKey, IdempotencyMiddleware, LastAttempt, RetryPolicy, Stopped,
};
use idem_core::TenantSecret;
use idem_store_memory::MemoryStore;
use idem_test_support::{Counter, key_of};
use idem_tower::IdempotencyLayer;
use reqwest_middleware::ClientWithMiddleware;
use tower::ServiceExt;

/// One request as the front saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    key: Option<String>,
    arrived: Instant,
    arrived_wall: SystemTime,
    /// Status the app answered (`None`: still running).
    status: Option<StatusCode>,
    answered: Option<Instant>,
}

/// A `Retry-After` the app sent.
#[derive(Debug, Clone)]
struct Asked {
    key: String,
    sent: Instant,
    /// Delta-seconds form.
    after: Option<Duration>,
    /// HTTP-date form.
    not_before: Option<SystemTime>,
}

#[derive(Default)]
struct Log {
    seen: Mutex<Vec<Seen>>,
    executions: Counter,
    asked: Mutex<Vec<Asked>>,
    /// Set once the front has answered a 409: releases the slow handler.
    conflict: tokio::sync::watch::Sender<bool>,
}

impl Log {
    fn execute(&self, path: &str, h: &HeaderMap) -> usize {
        self.executions.hit(&format!("{path} {}", key_of(h)))
    }

    fn executions(&self, path: &str, key: &str) -> usize {
        self.executions.get(&format!("{path} {key}"))
    }

    fn seen(&self, path: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }
}

type Shared = Arc<Log>;

async fn charge(State(log): State<Shared>, h: HeaderMap, body: Bytes) -> impl IntoResponse {
    let n = log.execute("/v1/charges", &h);
    (
        StatusCode::CREATED,
        format!(
            r#"{{"key":"{}","execution":{n},"request":{}}}"#,
            key_of(&h),
            String::from_utf8_lossy(&body)
        ),
    )
}

/// 503 with `Retry-After` on the first two executions per key (idem does not store a
/// 503: the key is released and the retry executes), then 201.
async fn busy(log: Shared, h: HeaderMap, date: bool) -> Response<Body> {
    let n = log.execute("/v1/busy", &h);
    if n > 2 {
        return (StatusCode::CREATED, format!("created after {n} executions")).into_response();
    }
    let now = SystemTime::now();
    let (value, asked) = if date {
        // HTTP-dates have whole seconds: 2 s ahead, truncated, is at least 1 s ahead.
        let date = now + Duration::from_secs(2);
        let text = httpdate::fmt_http_date(date);
        let not_before = httpdate::parse_http_date(&text).unwrap();
        (text, (None, Some(not_before)))
    } else {
        ("1".to_owned(), (Some(Duration::from_secs(1)), None))
    };
    log.asked.lock().unwrap().push(Asked {
        key: key_of(&h),
        sent: Instant::now(),
        after: asked.0,
        not_before: asked.1,
    });
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("retry-after", value)],
        "busy, come back later",
    )
        .into_response()
}

/// Runs until the front has answered a duplicate with 409: the first attempt is
/// still executing when the retry arrives, by construction rather than by timing.
async fn slow(State(log): State<Shared>, h: HeaderMap) -> impl IntoResponse {
    let n = log.execute("/v1/slow", &h);
    let mut conflict = log.conflict.subscribe();
    // Bounded, so that a broken client fails the test instead of hanging it.
    let _ = tokio::time::timeout(Duration::from_secs(20), conflict.wait_for(|c| *c)).await;
    (StatusCode::CREATED, format!("slow charge, execution {n}"))
}

async fn invalid(State(log): State<Shared>, h: HeaderMap) -> impl IntoResponse {
    log.execute("/v1/invalid", &h);
    (
        StatusCode::BAD_REQUEST,
        [("content-type", "application/json")],
        r#"{"error":"amount must be positive"}"#,
    )
}

async fn down(State(log): State<Shared>, h: HeaderMap) -> impl IntoResponse {
    let n = log.execute("/v1/down", &h);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("down, execution {n}"),
    )
}

async fn broken(State(log): State<Shared>, h: HeaderMap) -> impl IntoResponse {
    let n = log.execute("/v1/broken", &h);
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("bug, execution {n}"),
    )
}

async fn read(State(log): State<Shared>, h: HeaderMap) -> impl IntoResponse {
    log.execute("/v1/charges GET", &h);
    (StatusCode::SERVICE_UNAVAILABLE, "reads are down")
}

struct Server {
    addr: SocketAddr,
    log: Shared,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn start() -> Server {
    let log = Shared::default();
    let layer = IdempotencyLayer::<MemoryStore>::new(
        Arc::new(MemoryStore::new()),
        TenantSecret::new(b"idem-client-loopback-secret".to_vec()).unwrap(),
    );
    let app = Router::new()
        .route("/v1/charges", post(charge).get(read))
        .route("/v1/drop", post(charge))
        .route("/v1/cut", post(charge))
        .route(
            "/v1/busy",
            post(|State(log): State<Shared>, h: HeaderMap| busy(log, h, false)),
        )
        .route(
            "/v1/busy-date",
            post(|State(log): State<Shared>, h: HeaderMap| busy(log, h, true)),
        )
        .route("/v1/slow", post(slow))
        .route("/v1/invalid", post(invalid))
        .route("/v1/down", post(down))
        .route("/v1/broken", post(broken))
        .layer(layer)
        .with_state(log.clone());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let front_log = log.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (app, log) = (app.clone(), front_log.clone());
            let service =
                hyper::service::service_fn(move |req| front(app.clone(), log.clone(), req));
            tokio::spawn(async move {
                // A dropped connection is what some tests ask for.
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server { addr, log }
}

/// The fault-injecting front, outside the idem layer.
async fn front(
    app: Router,
    log: Shared,
    req: Request<Incoming>,
) -> Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>> {
    let path = req.uri().path().to_owned();
    let key = req
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned());
    let (index, nth) = {
        let mut seen = log.seen.lock().unwrap();
        let nth = 1 + seen
            .iter()
            .filter(|s| s.path == path && s.key == key)
            .count();
        seen.push(Seen {
            method: req.method().clone(),
            path: path.clone(),
            key: key.clone(),
            arrived: Instant::now(),
            arrived_wall: SystemTime::now(),
            status: None,
            answered: None,
        });
        (seen.len() - 1, nth)
    };
    // The app runs to the end in its own task, body drained (so idem stores the
    // outcome), even when the caller has gone: a server that finishes work it started.
    let task = tokio::spawn(async move {
        let res = app
            .oneshot(req.map(Body::new))
            .await
            .unwrap_or_else(|e: Infallible| match e {});
        let (parts, body) = res.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        {
            let mut seen = log.seen.lock().unwrap();
            seen[index].status = Some(parts.status);
            seen[index].answered = Some(Instant::now());
        }
        if parts.status == StatusCode::CONFLICT {
            log.conflict.send_replace(true);
        }
        Response::from_parts(parts, Body::from(body))
    });
    let res = task.await?;
    if path == "/v1/drop" && nth == 1 {
        // Executed and stored, but the answer never reaches the caller.
        return Err("the connection is dropped after execution".into());
    }
    if path == "/v1/cut" && nth == 1 {
        // Head and half the body, then the connection breaks: what an idem server
        // does when it could not store the outcome.
        let (parts, body) = res.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await?;
        let half = body.slice(..body.len() / 2);
        // The pause lets the head and the first half go out before the break.
        let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(half)]).chain(
            futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(std::io::Error::other("the body breaks off"))
            }),
        );
        let mut res = Response::from_parts(parts, Body::from_stream(chunks));
        res.headers_mut().insert(
            axum::http::header::CONTENT_LENGTH,
            body.len().to_string().parse().unwrap(),
        );
        return Ok(res);
    }
    Ok(res)
}

fn client(policy: RetryPolicy) -> ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(IdempotencyMiddleware::new(policy))
        .build()
}

/// Fast backoff, so that tests spend their time on the server's `Retry-After` only.
fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .with_max_elapsed(Duration::from_secs(30))
}

fn post_json(
    client: &ClientWithMiddleware,
    url: String,
    body: &str,
) -> reqwest_middleware::RequestBuilder {
    client
        .post(url)
        .header("authorization", "Bearer sk_test_alice")
        .header("content-type", "application/json")
        .body(body.to_owned())
}

fn keys(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(|s| s.key.clone().expect("a key")).collect()
}

fn idem_error(e: reqwest_middleware::Error) -> Error {
    match e {
        reqwest_middleware::Error::Middleware(e) => e.downcast().expect("an idem_client::Error"),
        other => panic!("not an idem-client error: {other:?}"),
    }
}

#[tokio::test]
async fn dropped_answer_is_retried_with_the_same_key_and_replayed() {
    let s = start().await;
    let res = post_json(&client(policy()), s.url("/v1/drop"), r#"{"amount":100}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let key = res.extensions().get::<IdempotencyKey>().unwrap().clone();
    let body = res.text().await.unwrap();

    let seen = s.log.seen("/v1/drop");
    assert_eq!(seen.len(), 2, "one lost answer, one retry");
    assert_eq!(keys(&seen), [key.as_str(), key.as_str()]);
    assert_eq!(
        s.log.executions("/v1/charges", key.as_str()),
        1,
        "executed once"
    );
    // The original answer, not a second charge.
    assert_eq!(
        body,
        format!(r#"{{"key":"{key}","execution":1,"request":{{"amount":100}}}}"#)
    );
}

#[tokio::test]
async fn a_body_that_breaks_off_is_retried_with_the_same_key_and_replayed() {
    let s = start().await;
    let res = post_json(&client(policy()), s.url("/v1/cut"), r#"{"amount":100}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert!(res.url().path().ends_with("/v1/cut"), "the URL is kept");
    let key = res.extensions().get::<IdempotencyKey>().unwrap().clone();
    let body = res.text().await.unwrap();
    let seen = s.log.seen("/v1/cut");
    assert_eq!(keys(&seen), [key.as_str(), key.as_str()]);
    assert_eq!(s.log.executions("/v1/charges", key.as_str()), 1);
    assert_eq!(
        body,
        format!(r#"{{"key":"{key}","execution":1,"request":{{"amount":100}}}}"#)
    );

    // Without reading ahead, the broken body is the caller's.
    let res = post_json(
        &client(policy().with_read_body_up_to(0)),
        s.url("/v1/cut"),
        r#"{"amount":100}"#,
    )
    .send()
    .await
    .unwrap();
    assert!(res.text().await.is_err());
}

#[tokio::test]
async fn retry_after_in_seconds_is_honoured_until_success() {
    let s = start().await;
    let res = post_json(&client(policy()), s.url("/v1/busy"), "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(res.text().await.unwrap(), "created after 3 executions");

    let seen = s.log.seen("/v1/busy");
    assert_eq!(seen.len(), 3, "two 503s, then success");
    let key = seen[0].key.clone().unwrap();
    assert_eq!(keys(&seen), vec![key.clone(); 3]);
    assert_eq!(uuid::Uuid::parse_str(&key).unwrap().get_version_num(), 4);
    assert_eq!(s.log.executions("/v1/busy", &key), 3, "a 503 is not stored");
    let asked = s.log.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2);
    for (i, a) in asked.iter().enumerate() {
        assert_eq!(a.key, key);
        // Causal, not a threshold: the retry cannot arrive before the server allowed.
        assert!(
            seen[i + 1].arrived >= a.sent + a.after.unwrap(),
            "attempt {} came back before Retry-After",
            i + 2
        );
    }
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let s = start().await;
    let res = post_json(&client(policy()), s.url("/v1/busy-date"), "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let seen = s.log.seen("/v1/busy-date");
    assert_eq!(seen.len(), 3);
    let asked = s.log.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2);
    for (i, a) in asked.iter().enumerate() {
        assert!(
            seen[i + 1].arrived_wall >= a.not_before.unwrap(),
            "attempt {} came back before the date in Retry-After",
            i + 2
        );
    }
}

#[tokio::test]
async fn in_use_409_is_waited_out_and_ends_with_the_replay() {
    let s = start().await;
    // The first attempt times out client-side while the handler still runs; the retry
    // gets 409 in-use; after its Retry-After, the replay.
    let policy = policy()
        .with_max_attempts(10)
        .with_attempt_timeout(Some(Duration::from_millis(300)));
    let res = post_json(&client(policy), s.url("/v1/slow"), r#"{"amount":7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.text().await.unwrap(), "slow charge, execution 1");

    let seen = s.log.seen("/v1/slow");
    let key = seen[0].key.clone().unwrap();
    assert!(keys(&seen).iter().all(|k| *k == key), "{seen:?}");
    assert_eq!(
        s.log.executions("/v1/slow", &key),
        1,
        "executed exactly once"
    );
    let statuses: Vec<_> = seen.iter().map(|s| s.status.map(|s| s.as_u16())).collect();
    let conflict = seen
        .iter()
        .position(|s| s.status == Some(StatusCode::CONFLICT))
        .unwrap_or_else(|| panic!("no 409 in {statuses:?}"));
    assert!(conflict >= 1, "{statuses:?}");
    assert_eq!(
        seen.last().unwrap().status,
        Some(StatusCode::CREATED),
        "{statuses:?}"
    );
    // idem's Retry-After on 409 is 1 s: the next attempt waited for it.
    let answered = seen[conflict].answered.unwrap();
    assert!(seen[conflict + 1].arrived >= answered + Duration::from_secs(1));
}

#[tokio::test]
async fn a_400_is_not_retried_and_says_so() {
    let s = start().await;
    let err = post_json(&client(policy()), s.url("/v1/invalid"), r#"{"amount":0}"#)
        .send()
        .await
        .unwrap_err();
    let seen = s.log.seen("/v1/invalid");
    assert_eq!(seen.len(), 1, "not retried");
    let key = seen[0].key.clone().unwrap();
    assert_eq!(s.log.executions("/v1/invalid", &key), 1);
    match idem_error(err) {
        Error::Refused {
            key: k,
            status,
            body,
            ..
        } => {
            assert_eq!(k.as_str(), key);
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body, r#"{"error":"amount must be positive"}"#);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_key_reused_with_another_payload_is_a_422_not_retried() {
    let s = start().await;
    let client = client(policy());
    let first = post_json(&client, s.url("/v1/charges"), r#"{"amount":100}"#)
        .header("idempotency-key", "order-1001")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);

    let err = post_json(&client, s.url("/v1/charges"), r#"{"amount":999}"#)
        .header("idempotency-key", "order-1001")
        .send()
        .await
        .unwrap_err();
    let err = idem_error(err);
    assert!(!err.is_retryable());
    match &err {
        Error::KeyReused { key, status, body } => {
            assert_eq!(key.as_str(), "order-1001");
            assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY);
            let doc: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(doc["type"], "urn:idem:problem:idempotency-key-reused");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("order-1001"));
    let seen = s.log.seen("/v1/charges");
    assert_eq!(
        seen.len(),
        2,
        "one attempt per call: the 422 was not retried"
    );
    assert_eq!(keys(&seen), ["order-1001", "order-1001"]);
    assert_eq!(seen[1].status, Some(StatusCode::UNPROCESSABLE_ENTITY));
    assert_eq!(s.log.executions("/v1/charges", "order-1001"), 1);
}

#[tokio::test]
async fn gives_up_after_max_attempts_with_the_last_status() {
    let s = start().await;
    let err = post_json(
        &client(policy().with_max_attempts(3)),
        s.url("/v1/down"),
        "{}",
    )
    .send()
    .await
    .unwrap_err();
    let err = idem_error(err);
    assert!(err.is_retryable(), "the caller may try again later");
    let seen = s.log.seen("/v1/down");
    assert_eq!(seen.len(), 3);
    let key = seen[0].key.clone().unwrap();
    assert_eq!(keys(&seen), vec![key.clone(); 3]);
    assert_eq!(s.log.executions("/v1/down", &key), 3);
    match err {
        Error::GaveUp {
            key: k,
            attempts,
            stopped,
            last: LastAttempt::Status { status, body, .. },
        } => {
            assert_eq!(k.as_str(), key);
            assert_eq!(attempts, 3);
            assert_eq!(stopped, Stopped::MaxAttempts);
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body, "down, execution 3");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_stored_500_comes_back_as_a_replay_and_is_final() {
    let s = start().await;
    let err = post_json(&client(policy()), s.url("/v1/broken"), "{}")
        .send()
        .await
        .unwrap_err();
    let seen = s.log.seen("/v1/broken");
    assert_eq!(seen.len(), 2, "the 500, then its replay, which is final");
    let key = seen[0].key.clone().unwrap();
    assert_eq!(s.log.executions("/v1/broken", &key), 1);
    match idem_error(err) {
        Error::Failed {
            status,
            headers,
            body,
            ..
        } => {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(headers["idempotent-replayed"], "true");
            assert_eq!(body, "bug, execution 1");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn get_is_untouched() {
    let s = start().await;
    let res = client(policy())
        .get(s.url("/v1/charges"))
        .send()
        .await
        .unwrap();
    // A 503 that a POST would retry: a GET passes through as it is.
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.extensions().get::<IdempotencyKey>().is_none());
    let seen = s.log.seen("/v1/charges");
    assert_eq!(seen.len(), 1, "no retry");
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(seen[0].key, None, "no key added");
}

#[tokio::test]
async fn the_callers_key_is_used_from_the_header_or_an_extension() {
    let s = start().await;
    let client = client(policy());
    let from_extension = IdempotencyKey::new("order-ext-1").unwrap();
    let res = post_json(&client, s.url("/v1/busy"), "{}")
        .with_extension(from_extension.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(
        keys(&s.log.seen("/v1/busy")),
        ["order-ext-1", "order-ext-1", "order-ext-1"]
    );
    assert_eq!(
        res.extensions().get::<IdempotencyKey>(),
        Some(&from_extension)
    );

    let res = post_json(&client, s.url("/v1/charges"), "{}")
        .header("idempotency-key", "order-hdr-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(keys(&s.log.seen("/v1/charges")), ["order-hdr-1"]);
}

#[tokio::test]
async fn a_streaming_body_is_sent_once_and_the_error_says_why() {
    let s = start().await;
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from_static(b"{}"))];
    let err = client(policy())
        .post(s.url("/v1/down"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap_err();
    assert_eq!(s.log.seen("/v1/down").len(), 1, "sent once");
    let err = idem_error(err);
    assert!(err.to_string().contains("streaming body"), "{err}");
    match err {
        Error::NotRepeatable { last, .. } => {
            assert_eq!(last.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported_with_its_source() {
    // A port nobody listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = client(policy().with_max_attempts(3))
        .post(format!("http://{addr}/v1/charges"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    let err = idem_error(err);
    assert!(err.is_retryable());
    match &err {
        Error::GaveUp {
            attempts,
            last: LastAttempt::Transport(reqwest_middleware::Error::Reqwest(e)),
            ..
        } => {
            assert_eq!(*attempts, 3);
            assert!(e.is_connect(), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(std::error::Error::source(&err).is_some());
}
